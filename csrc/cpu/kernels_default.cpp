// The dense epilogues for any CPU: ATen's portable Vectorized (CPU_CAPABILITY=DEFAULT from setup.py).
#define FL_ISA isa_default
#include "cpu/kernels_impl.h"
