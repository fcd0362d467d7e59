// The extension module. It is a Python module only so that `import fusedlayers._C` loads the op registrations:
// each op family adds its schemas with a TORCH_LIBRARY_FRAGMENT of its own (csrc/ops/<family>.cpp), each backend
// its kernels with TORCH_LIBRARY_IMPL (csrc/cpu/, csrc/cuda/; fusedlayers/triton/ from Python).
#include <Python.h>

#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "backend.h"

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

// The namespace; the ops come from the families' fragments. backend_table() is csrc/backend.h's (names,
// kernel prefixes), for the test that compares it with fusedlayers/backends.py.
TORCH_LIBRARY(fusedlayers, m) {
  m.def("backend_table() -> (str[], str[])", [] {
    std::vector<std::string> names, prefixes;
    for (const auto& b : fusedlayers::kBackends) {
      names.emplace_back(b.name);
      prefixes.emplace_back(b.prefix);
    }
    return std::make_tuple(names, prefixes);
  });
}
