// The slab op library: STABLE_TORCH_LIBRARY declares the namespace (in libslab_ops.so only); each
// family adds its schemas with STABLE_TORCH_LIBRARY_FRAGMENT in csrc/<family>/<family>_ops.cpp.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(slab, m) { (void)m; }
