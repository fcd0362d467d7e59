// The CPU kernels for any CPU: ATen's portable Vectorized (CPU_CAPABILITY=DEFAULT from setup.py), no pragma.
#define FL_TARGET_DEFAULT
#include "cpu/kernels_isa.h"
