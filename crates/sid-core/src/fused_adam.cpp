// libtorch's fused Adam kernel (torch.optim.Adam(fused=True)) as a plain C function for Rust:
// tch does not expose tensor-list ops. One call updates every parameter of a unit with one
// multi-tensor kernel on CUDA (one loop on the CPU) instead of nine ops per parameter.
// Returns 0 on success; a C++ exception becomes 1 with its message in `err`.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adam.h>
#include <sid_shim.h>

#include <cstddef>
#include <vector>

extern "C" int sid_fused_adam(const at::Tensor* const* params, const at::Tensor* const* grads,
                              const at::Tensor* const* exp_avgs,
                              const at::Tensor* const* exp_avg_sqs, const at::Tensor* step,
                              size_t n, double lr, double beta1, double beta2, double eps,
                              char* err, size_t err_len) {
  return sid::guarded(err, err_len, [&] {
    std::vector<at::Tensor> p, g, m, v, s;
    p.reserve(n);
    g.reserve(n);
    m.reserve(n);
    v.reserve(n);
    s.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      p.push_back(*params[i]);
      g.push_back(*grads[i]);
      m.push_back(*exp_avgs[i]);
      v.push_back(*exp_avg_sqs[i]);
      s.push_back(*step);
    }
    at::_fused_adam_(p, g, m, v, {}, s, lr, beta1, beta2, /*weight_decay=*/0.0, eps,
                     /*amsgrad=*/false, /*maximize=*/false);
  });
}
