// The linear cross-entropy family: the loss of logits = hidden @ weight.T + bias without ever holding more than
// one chunk of rows of the (N, V) logits, as one op with one autograd node. Its kernels are device-generic, one
// per backend: the GEMMs are ATen's, the per-chunk softmax cross-entropy is that backend's cross_entropy kernels.
//
// The forward can also compute the gradients (for a "mean"/"sum" reduction, whose upstream gradient is one
// scalar: the backward then only scales them), so the logits are computed once; the backward op recomputes
// each chunk's logits, for per-row upstream gradients ("none", or a gradient reaching lse).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "backend.h"
#include "ops/cross_entropy.h"

namespace fusedlayers {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_linear_ce_args(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
                          int64_t chunk_size) {
  TORCH_CHECK(hidden.dim() == 2, "linear_cross_entropy(): expected hidden of shape (N, H), got shape ", hidden.sizes());
  TORCH_CHECK(hidden.is_floating_point(), "linear_cross_entropy(): expected floating-point hidden, got ",
              py(hidden.scalar_type()));
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), "linear_cross_entropy(): expected weight of "
              "shape (V, ", hidden.size(1), ") for hidden of shape ", hidden.sizes(), ", got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "linear_cross_entropy(): expected weight to have the "
              "dtype of hidden (", py(hidden.scalar_type()), "), got ", py(weight.scalar_type()));
  TORCH_CHECK(weight.device() == hidden.device(), "linear_cross_entropy(): expected weight on the device of hidden (",
              hidden.device(), "), got ", weight.device());
  check_per_class(bias, "linear_cross_entropy", "bias", weight.size(0), hidden, "hidden");
  // checked here, not by the chunks' cross_entropy kernels, whose messages call it "weight"
  check_per_class(class_weight, "linear_cross_entropy", "class_weight", weight.size(0), hidden, "hidden");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == hidden.size(0), "linear_cross_entropy(): expected target of "
              "shape (", hidden.size(0), ",), got shape ", target.sizes());
  TORCH_CHECK_VALUE(chunk_size >= 1, "linear_cross_entropy(): chunk_size must be positive, got ", chunk_size);
}

struct LinearCe {
  const at::Tensor& hidden;
  const at::Tensor& weight;
  const std::optional<at::Tensor>& bias;
  const at::Tensor& target;
  const std::optional<at::Tensor>& class_weight;
  int64_t ignore_index;
  double label_smoothing;
  double z_loss;
  std::optional<double> softcap;
  int64_t chunk_size;
  Backend backend;
};

// Gradient accumulators: dh in hidden's dtype, dw and db in the math dtype (float32 for low precision).
struct Grads {
  at::Tensor dh, dw, db;
};

Grads make_grads(const LinearCe& a, std::array<bool, 3> mask) {
  const auto acc = at::toOpMathType(a.hidden.scalar_type());
  Grads g;
  if (mask[0]) g.dh = at::empty_like(a.hidden, at::MemoryFormat::Contiguous);
  if (mask[1]) g.dw = at::zeros(a.weight.sizes(), a.weight.options().dtype(acc));
  if (mask[2] && a.bias.has_value()) g.db = at::zeros({a.weight.size(0)}, a.weight.options().dtype(acc));
  return g;
}

// One pass over the chunks of rows: each chunk's logits, then the forward kernel when `loss` is defined
// (writing loss and lse), and the backward kernel with the rows' grad_loss (or one scalar for all rows) and
// grad_lse when `grads` wants any gradient; lse is read from `lse` when the forward is not run.
void run_chunks(const LinearCe& a, const at::Tensor& loss, const at::Tensor& lse, const at::Tensor& grad_loss,
                const at::Tensor& grad_lse, Grads& grads) {
  const int64_t N = a.hidden.size(0), V = a.weight.size(0);
  const bool backward = grads.dh.defined() || grads.dw.defined() || grads.db.defined();
  const auto acc = at::toOpMathType(a.hidden.scalar_type());
  const at::Tensor wt = a.weight.t();
  at::Tensor buffer = at::empty({std::min(a.chunk_size, N), V}, a.hidden.options());  // reused by every chunk
  for (int64_t s = 0; s < N; s += a.chunk_size) {
    const int64_t n = std::min(a.chunk_size, N - s);
    const at::Tensor h = a.hidden.narrow(0, s, n);
    const at::Tensor t = a.target.narrow(0, s, n);
    at::Tensor logits = buffer.narrow(0, 0, n);
    if (a.bias.has_value()) {
      at::addmm_out(logits, *a.bias, h, wt);
    } else {
      at::mm_out(logits, h, wt);
    }
    at::Tensor lse_c;
    if (loss.defined()) {
      auto [l, row_lse] = ce_forward_op(a.backend).call(logits, t, a.class_weight, a.ignore_index, a.label_smoothing,
                                                       a.z_loss, a.softcap, "none");
      loss.narrow(0, s, n).copy_(l);
      lse.narrow(0, s, n).copy_(row_lse);
      lse_c = row_lse;
    } else {
      lse_c = lse.narrow(0, s, n);
    }
    if (!backward) continue;
    const at::Tensor gl = grad_loss.dim() == 0 ? grad_loss.expand({n}) : grad_loss.narrow(0, s, n);
    const at::Tensor g = ce_backward_op(a.backend).call(gl, grad_lse.defined() ? opt(grad_lse.narrow(0, s, n))
                                                                               : std::nullopt,
                                                       logits, t, a.class_weight, lse_c, a.ignore_index,
                                                       a.label_smoothing, a.z_loss, a.softcap, "none");
    if (grads.dh.defined()) {
      at::Tensor dh = grads.dh.narrow(0, s, n);
      at::mm_out(dh, g, a.weight);
    }
    if (grads.dw.defined() || grads.db.defined()) {
      const at::Tensor g_acc = g.to(acc);
      if (grads.dw.defined()) grads.dw.addmm_(g_acc.t(), h.to(acc));
      if (grads.db.defined()) grads.db.add_(g_acc.sum(0));
    }
  }
}

// Returns (loss, lse, dh, dw, db): loss (N,) for reduction "none", else 0-d; lse (N,). With output_mask
// (only for "mean"/"sum"), also the gradients of the reduced loss w.r.t. hidden, weight and bias (undefined
// where not asked), dw and db in the math dtype.
template <Backend B>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
    double label_smoothing, double z_loss, std::optional<double> softcap, c10::string_view reduction,
    int64_t chunk_size, std::array<bool, 3> output_mask) {
  check_linear_ce_args(hidden, weight, bias, target, class_weight, chunk_size);
  parse_reduction(reduction, "linear_cross_entropy");
  const bool with_grads = output_mask[0] || output_mask[1] || output_mask[2];
  TORCH_CHECK(!(with_grads && reduction == "none"), "linear_cross_entropy_forward(): gradients are computed in the "
              "forward only for a 'mean' or 'sum' reduction");
  const LinearCe a{hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, z_loss, softcap,
                   chunk_size, B};
  const auto math = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = hidden.size(0);
  at::Tensor loss = at::empty({N}, hidden.options().dtype(math));
  at::Tensor lse = at::empty({N}, hidden.options().dtype(math));
  // A "mean" divides by the summed class weights of the kept rows (ce_mean, ops/cross_entropy.h).
  const at::Tensor denominator = reduction == "mean"
                                     ? kept_weights(target, class_weight, ignore_index, math).sum()
                                     : at::ones({}, hidden.options().dtype(math));
  Grads grads = make_grads(a, output_mask);
  run_chunks(a, loss, lse, with_grads ? denominator.reciprocal() : at::Tensor(), at::Tensor(), grads);
  if (reduction != "none") loss = ce_mean(loss.sum(), denominator, label_smoothing);
  return {loss, lse, grads.dh, grads.dw, grads.db};
}

// Returns (dh, dw, db) of sum(grad_loss * loss + grad_lse * lse) over the rows (undefined where not asked; dw
// and db in the math dtype), recomputing each chunk's logits. grad_loss None means zero.
template <Backend B>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_lse, const at::Tensor& hidden,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    const std::optional<at::Tensor>& class_weight, const at::Tensor& lse, int64_t ignore_index, double label_smoothing,
    double z_loss, std::optional<double> softcap, int64_t chunk_size, std::array<bool, 3> output_mask) {
  check_linear_ce_args(hidden, weight, bias, target, class_weight, chunk_size);
  const LinearCe a{hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, z_loss, softcap,
                   chunk_size, B};
  Grads grads = make_grads(a, output_mask);
  run_chunks(a, at::Tensor(), lse, grad_loss.has_value() ? *grad_loss : at::zeros_like(lse),
             grad_lse.value_or(at::Tensor()), grads);
  return {grads.dh, grads.dw, grads.db};
}

using LinearCeForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
    const std::optional<at::Tensor>&, int64_t, double, double, std::optional<double>, c10::string_view, int64_t,
    std::array<bool, 3>);
using LinearCeBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, int64_t,
    double, double, std::optional<double>, int64_t, std::array<bool, 3>);

constinit const KernelOp<LinearCeForwardFn> linear_ce_forward_op("linear_cross_entropy_forward");

constinit const KernelOp<LinearCeBackwardFn> linear_ce_backward_op("linear_cross_entropy_backward");

// One autograd node. For "mean"/"sum" the forward also computes the gradients of the loss (the logits are
// computed once) and the backward scales them by the upstream scalar; per-row upstream gradients ("none",
// or one reaching lse) go through the backward op, which recomputes each chunk's logits.
class LinearCrossEntropyFunction : public torch::autograd::Function<LinearCrossEntropyFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& target,
                               const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
                               double label_smoothing, double z_loss, std::optional<double> softcap,
                               c10::string_view reduction, int64_t chunk_size, c10::string_view backend) {
    // float16 on a GPU recomputes in the backward (precomputed_may_overflow): no gradients here
    const bool precompute = reduction != "none" && !(hidden.scalar_type() == at::kHalf && !hidden.is_cpu());
    const std::array<bool, 3> mask = {precompute && hidden.requires_grad(), precompute && weight.requires_grad(),
                                      precompute && bias.has_value() && bias->requires_grad()};
    const Backend kernels = parse_backend(backend);
    auto [loss, lse, dh, dw, db] = linear_ce_forward_op(kernels).call(hidden, weight, bias, target, class_weight,
                                                                        ignore_index, label_smoothing, z_loss,
                                                                        softcap, reduction, chunk_size, mask);
    ctx->save_for_backward({hidden, weight, bias.value_or(at::Tensor()), target, class_weight.value_or(at::Tensor()),
                            lse, dh, dw, db});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["z_loss"] = z_loss;
    ctx->saved_data["softcap"] = softcap ? c10::IValue(*softcap) : c10::IValue();
    ctx->saved_data["precompute"] = precompute;
    ctx->saved_data["reduction"] = static_cast<int64_t>(parse_reduction(reduction));
    ctx->set_materialize_grads(false);  // an output with no gradient must not cost a recompute pass
    ctx->saved_data["chunk_size"] = chunk_size;
    ctx->saved_data["backend"] = static_cast<int64_t>(kernels);
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(), "linear_cross_entropy(): double backward (create_graph=True) is not "
                "supported; compute the loss as cross_entropy(hidden @ weight.T + bias, target) for higher-order "
                "gradients");
    variable_list out(12);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &hidden = saved[0], &weight = saved[1], &bias = saved[2], &target = saved[3];
    const at::Tensor &class_weight = saved[4], &lse = saved[5];
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      bias.defined() && ctx->needs_input_grad(2)};
    const bool precompute = ctx->saved_data["precompute"].toBool();
    // With a gradient of lse too, the loss's goes through the backward op with it, not as the precomputed
    // gradients plus the lse's: summed after the GEMMs, an lse gradient's 0 * inf (a zero probability at an inf
    // weight) made a NaN where autograd's one dlogits gives inf (found by the 4000-example run).
    const bool apart = precompute && grads[0].defined() && !grads[1].defined() &&
                       !precomputed_may_overflow(hidden, grads[0]);
    at::Tensor dh, dw, db;
    if (apart) {
      if (mask[0]) dh = saved[6] * grads[0];
      if (mask[1]) dw = saved[7] * grads[0];
      if (mask[2]) db = saved[8] * grads[0];
    }
    if (grads[1].defined() || (grads[0].defined() && !apart)) {
      const auto& cap = ctx->saved_data["softcap"];
      const auto kernels = static_cast<Backend>(ctx->saved_data["backend"].toInt());
      const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
      std::optional<at::Tensor> grad_loss;
      if (grads[0].defined()) {
        const auto red = static_cast<CeReduction>(ctx->saved_data["reduction"].toInt());
        grad_loss = red == CeReduction::None
                        ? grads[0]
                        : ce_row_grad_loss(grads[0], target, opt(class_weight), ignore_index, red, lse.scalar_type());
      }
      auto [rh, rw, rb] = linear_ce_backward_op(kernels).call(
          grad_loss, opt(grads[1]), hidden, weight, opt(bias), target,
          opt(class_weight), lse, ignore_index, ctx->saved_data["label_smoothing"].toDouble(),
          ctx->saved_data["z_loss"].toDouble(),
          cap.isNone() ? std::nullopt : std::optional<double>(cap.toDouble()), ctx->saved_data["chunk_size"].toInt(),
          mask);
      dh = dh.defined() ? dh + rh : rh;
      dw = dw.defined() ? dw + rw : rw;
      db = db.defined() ? db + rb : rb;
    }
    out[0] = dh.defined() ? dh.to(hidden.scalar_type()) : dh;
    out[1] = dw.defined() ? dw.to(weight.scalar_type()) : dw;
    out[2] = db.defined() ? db.to(bias.scalar_type()) : db;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_no_autograd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
    double label_smoothing, double z_loss, std::optional<double> softcap, c10::string_view reduction,
    int64_t chunk_size, c10::string_view backend) {
  auto out = linear_ce_forward_op(parse_backend(backend))
                 .call(hidden, weight, bias, target, class_weight, ignore_index, label_smoothing, z_loss, softcap,
                       reduction, chunk_size, {false, false, false});
  return {std::get<0>(out), std::get<1>(out)};
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_autograd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
    double label_smoothing, double z_loss, std::optional<double> softcap, c10::string_view reduction,
    int64_t chunk_size, c10::string_view backend) {
  const at::Tensor no_bias;
  check_no_forward_grad({&hidden, &weight, bias.has_value() ? &*bias : &no_bias});
  check_weight_not_differentiable(class_weight, "linear_cross_entropy");
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (hidden.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad()));
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return linear_cross_entropy_no_autograd(hidden, weight, bias, target, class_weight, ignore_index, label_smoothing,
                                            z_loss, softcap, reduction, chunk_size, backend);
  }
  auto out = LinearCrossEntropyFunction::apply(hidden, weight, bias, target, class_weight, ignore_index,
                                               label_smoothing, z_loss, softcap, reduction, chunk_size, backend);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace fusedlayers

TORCH_LIBRARY_FRAGMENT(fusedlayers, m) {
  // Cross-entropy of logits = hidden @ weight.T + bias (hidden (N, H), weight (V, H), bias (V,)) over chunks of
  // chunk_size rows, never the whole (N, V) logits; class_weight, ignore_index, ... as above. Returns (loss, lse):
  // loss (N,) for reduction "none", else the reduced 0-d loss ("mean": divided by the summed class weights of
  // the kept rows); lse (N,). Loss and lse in the math dtype.
  m.def("linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight, "
        "int ignore_index, float label_smoothing, float z_loss, float? softcap, str reduction, int chunk_size, "
        "str backend) -> (Tensor, Tensor)");
  // Device-generic kernels, one per backend: ATen GEMMs and that backend's cross_entropy kernels. The forward returns (loss, lse, dh, dw,
  // db): with output_mask (only for "mean"/"sum") the gradients of the loss w.r.t. hidden, weight and bias,
  // else undefined; the backward returns (dh, dw, db) of sum(grad_loss * loss + grad_lse * lse) over the rows
  // (grad_loss None: zero), recomputing each chunk's logits. dw and db are in the math dtype.
  fusedlayers::def_kernels(
      m, {"linear_cross_entropy_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
          "Tensor? class_weight, int ignore_index, float label_smoothing, float z_loss, float? softcap, "
          "str reduction, int chunk_size, bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
          "linear_cross_entropy_backward(Tensor? grad_loss, Tensor? grad_lse, Tensor hidden, Tensor weight, "
          "Tensor? bias, Tensor target, Tensor? class_weight, Tensor lse, int ignore_index, float label_smoothing, "
          "float z_loss, float? softcap, int chunk_size, bool[3] output_mask) -> (Tensor, Tensor, Tensor)"});

  fusedlayers::impl_differentiable(m, "linear_cross_entropy", &fusedlayers::linear_cross_entropy_autograd,
                                   &fusedlayers::linear_cross_entropy_no_autograd);
  fusedlayers::not_differentiable(m, {"linear_cross_entropy_forward", "linear_cross_entropy_backward"});
}

// Every backend's kernels are one device-generic loop over chunks, calling that backend's dense and
// cross-entropy kernels.
TORCH_LIBRARY_IMPL(fusedlayers, CompositeExplicitAutograd, m) {
  fusedlayers::for_each_backend([&](auto b) {
    constexpr fusedlayers::Backend B = decltype(b)::value;
    m.impl(fusedlayers::kernel_name(B, "linear_cross_entropy_forward").c_str(),
           &fusedlayers::linear_cross_entropy_forward<B>);
    m.impl(fusedlayers::kernel_name(B, "linear_cross_entropy_backward").c_str(),
           &fusedlayers::linear_cross_entropy_backward<B>);
  });
}
