// The kernel backends, as data. A differentiable op's `backend` argument names one; its kernels are the ops
// `<prefix><kernel>` (an op family defines their schemas once for every backend with def_kernels). Adding a
// backend is one row here and one in fusedlayers/backends.py, plus the folder that registers its kernels.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>

namespace fusedlayers {

enum class Backend : int8_t { Native, Triton };

struct BackendInfo {
  Backend backend;
  const char* name;    // the `backend` argument of the differentiable ops
  const char* prefix;  // of its kernel ops
};

// native: the C++ CPU and CUDA kernels, chosen by the dispatcher from the device; triton: registered from Python
// (fusedlayers/triton/).
constexpr std::array<BackendInfo, 2> kBackends = {{{Backend::Native, "native", ""}, {Backend::Triton, "triton", "triton_"}}};

// Rows in the enum's order: info() and KernelOp index the table by the enumerator.
constexpr bool rows_in_enum_order() {
  for (size_t i = 0; i < kBackends.size(); ++i) {
    if (static_cast<size_t>(kBackends[i].backend) != i) return false;
  }
  return true;
}
static_assert(rows_in_enum_order(), "kBackends: one row per Backend, in the enum's order");

inline const BackendInfo& info(Backend b) { return kBackends[static_cast<size_t>(b)]; }

inline Backend parse_backend(c10::string_view name) {
  std::string known;
  for (const auto& b : kBackends) {
    if (name == b.name) return b.backend;
    known += std::string(known.empty() ? "" : ", ") + b.name;
  }
  TORCH_CHECK_VALUE(false, "unknown kernel backend '", name, "'; expected one of: ", known);
}

inline std::string kernel_name(Backend b, const char* kernel) { return std::string(info(b).prefix) + kernel; }

// The schema `schema` (which starts with the kernel's name) for every backend, and an Autograd kernel that raises:
// kernels are not differentiable (a family's differentiable op is), so backpropagating through one never gives
// a silent zero.
inline void def_kernels(torch::Library& m, std::initializer_list<const char*> schemas) {
  for (const auto& b : kBackends) {
    for (const char* schema : schemas) m.def((std::string(b.prefix) + schema).c_str());
  }
}

inline void not_differentiable(torch::Library& m, std::initializer_list<const char*> kernels) {
  for (const auto& b : kBackends) {
    for (const char* kernel : kernels) {
      m.impl(kernel_name(b.backend, kernel).c_str(),
             torch::dispatch(c10::DispatchKey::Autograd, torch::autograd::autogradNotImplementedFallback()));
    }
  }
}

// One kernel op in every backend: op(backend) is the typed handle of `<prefix><kernel>`. Declared as a constant
// beside the family's code (constinit: no static-initialization order); every backend's handle is looked up at
// the first call, when the schemas are all registered (the Triton kernels behind them come later, from Python),
// and kept for the life of the process.
template <typename Fn>
class KernelOp {
 public:
  constexpr explicit KernelOp(const char* kernel) : kernel_(kernel) {}

  const c10::TypedOperatorHandle<Fn>& operator()(Backend b) const {
    const Handles* h = handles_.load(std::memory_order_acquire);
    if (h == nullptr) {
      Handles* found = new Handles(lookup(std::make_index_sequence<kBackends.size()>{}));
      if (handles_.compare_exchange_strong(h, found, std::memory_order_acq_rel)) {
        h = found;
      } else {
        delete found;  // another thread's lookup won; h is now its table
      }
    }
    return (*h)[static_cast<size_t>(b)];
  }

 private:
  using Handle = c10::TypedOperatorHandle<Fn>;
  using Handles = std::array<Handle, kBackends.size()>;
  template <size_t... I>
  Handles lookup(std::index_sequence<I...>) const {
    return {find(kBackends[I].backend)...};
  }
  Handle find(Backend b) const {
    const std::string name = "fusedlayers::" + kernel_name(b, kernel_);
    return c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "").template typed<Fn>();
  }
  const char* kernel_;
  mutable std::atomic<const Handles*> handles_{nullptr};
};

// Calls fn(std::integral_constant<Backend, B>{}) for every backend B: to register a kernel templated on the
// backend (a device-generic kernel that calls another family's kernels of its backend) under each prefix.
template <typename Fn, size_t... I>
void for_each_backend(Fn&& fn, std::index_sequence<I...>) {
  (fn(std::integral_constant<Backend, kBackends[I].backend>{}), ...);
}

template <typename Fn>
void for_each_backend(Fn&& fn) {
  for_each_backend(fn, std::make_index_sequence<kBackends.size()>{});
}

}  // namespace fusedlayers
