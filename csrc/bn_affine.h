// BatchNorm as an affine map and the NaN-propagating ReLU after it, shared by the CPU and CUDA kernels:
// y = z * scale + shift with invstd = 1 / sqrt(var + eps), scale = bn_weight * invstd, shift = bn_bias - mean * scale.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace psp {

template <typename acc_t>
struct BnAffine {
  acc_t invstd;
  acc_t scale;
  acc_t shift;
};

template <typename acc_t>
C10_HOST_DEVICE inline BnAffine<acc_t> bn_affine(acc_t bn_weight, acc_t bn_bias, acc_t mean, acc_t var, double eps) {
  const acc_t invstd = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
  const acc_t scale = bn_weight * invstd;
  return {invstd, scale, bn_bias - mean * scale};
}

// ReLU that propagates NaN like torch.relu: NaN < 0 is false.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t relu(acc_t y) {
  return y < acc_t(0) ? acc_t(0) : y;
}

}  // namespace psp
