// BLM_CUDA_GRAPHS (default 1; cuda/cuda_backend.cu, run_as_graph): the training step's device work
// captured once and replayed as a CUDA graph must give exactly the eager step's results.  Two
// backends from the same parameters, one with graphs and one without, train five AdamW steps
// side by side on batches of the same shape with different tokens (so the token groups of the
// embedding backward change between replays, and the padded group count is what keeps the
// graph valid); step 0 runs eagerly, step 1 is captured, steps 2-4 are replays.  Loss terms,
// every gradient tensor, the gradient norm and the parameters after each step are compared bit
// for bit: the same kernels run on the same data in the same order, only launched differently.
// Cases: bf16 and fp32, lambda 0 and 0.5 (exact barrier: a masked batch would change the
// barrier plan, and so the key, every step).
#include <cstdlib>
#include <memory>
#include <vector>

#include "core/backend.h"
#include "core/optim.h"
#include "core/params.h"
#include "cuda/cuda_backend.h"
#include "tests/catch.h"
#include "tests/gpu/backend_test_util.h"
#include "tests/gpu/gpu_test_util.h"

using namespace blm;
using namespace blm::gputest;

namespace {

// A CUDA backend of case c made with BLM_CUDA_GRAPHS = graphs (read by the constructor).
std::unique_ptr<Backend> make_backend(const ModelCase& c, double lambda, const char* precision,
                                      const char* graphs) {
  ScopedEnv env("BLM_CUDA_GRAPHS", graphs);
  return make_cuda_backend(cuda_config(c, lambda, precision), 0);
}

}  // namespace

TEST_CASE("cuda graphs: replayed training steps give the eager steps' bits", "[gpu][backend][graphs]") {
  const ModelCase c{"dh 32, 2 layers", model_config(67, 64, 2, 2, 16), 3, 13, {}, false};
  const ParamLayout layout(c.model);
  AdamWHyper h;
  for (const char* precision : {"bf16", "fp32"}) {
    for (const double lambda : {0.0, 0.5}) {
      INFO(precision << ", lambda " << lambda);
      const std::vector<float> params = test_params(layout, 91);
      std::unique_ptr<Backend> eager = make_backend(c, lambda, precision, "0");
      std::unique_ptr<Backend> graphed = make_backend(c, lambda, precision, "1");
      eager->set_parameters(params);
      graphed->set_parameters(params);
      for (int step = 0; step < 5; ++step) {
        INFO("step " << step);
        const HostBatch hb = make_batch(c, 500 + step);
        const ForwardOptions opts = options_for(hb);
        const LossTerms te = eager->forward_backward(hb.view(), opts);
        const LossTerms tg = graphed->forward_backward(hb.view(), opts);
        CHECK(tg.loss == te.loss);
        CHECK(tg.ce == te.ce);
        CHECK(tg.barrier == te.barrier);
        std::vector<float> ge, gg;
        eager->get_gradients(ge);
        graphed->get_gradients(gg);
        CHECK(bit_identical(gg, ge));
        const double ne = eager->grad_norm(), ng = graphed->grad_norm();
        CHECK(ng == ne);
        eager->adamw_step(h, 1e-2, clip_scale(ne, 1.0));
        graphed->adamw_step(h, 1e-2, clip_scale(ng, 1.0));
        std::vector<float> pe, pg;
        eager->get_parameters(pe);
        graphed->get_parameters(pg);
        CHECK(bit_identical(pg, pe));
      }
      // Two graphs a step (forward, backward).  Step 0 eager, step 1 captured and launched, steps
      // 2-4 replayed: 4 launches of each, none eager.
      CHECK(cuda_graph_launches(*graphed) == 8);
      CHECK(cuda_graph_launches(*eager) == 0);
    }
  }
  CHECK_THROWS_AS(make_backend(c, 0.0, "bf16", "yes"), ConfigError);
}

// A key that keeps changing: six keys in turn (the gradient scale is part of the key), 60 steps of
// two graphs each (forward, backward).  With eight graphs kept, every capture evicts the others,
// so the backend would capture again and again; after 32 captures it makes no new graph and runs
// new keys eagerly, while the graphs it kept still replay.  Every step must still give the eager
// backend's bits, and the launch count is that policy's: 59 (without the cap it would be 53
// launches from 48 captures).
TEST_CASE("cuda graphs: a key that keeps changing stops capturing after 32 graphs", "[gpu][backend][graphs]") {
  const ModelCase c{"dh 32, 2 layers", model_config(67, 64, 2, 2, 16), 3, 13, {}, false};
  const ParamLayout layout(c.model);
  const std::vector<float> params = test_params(layout, 93);
  std::unique_ptr<Backend> eager = make_backend(c, 0.0, "bf16", "0");
  std::unique_ptr<Backend> graphed = make_backend(c, 0.0, "bf16", "1");
  eager->set_parameters(params);
  graphed->set_parameters(params);
  const HostBatch hb = make_batch(c, 600);
  int differing = 0;
  for (int step = 0; step < 60; ++step) {
    ForwardOptions opts = options_for(hb);
    opts.grad_scale = 1.0f + 0.125f * static_cast<float>(step % 6);
    const LossTerms te = eager->forward_backward(hb.view(), opts);
    const LossTerms tg = graphed->forward_backward(hb.view(), opts);
    std::vector<float> ge, gg;
    eager->get_gradients(ge);
    graphed->get_gradients(gg);
    differing += !(tg.loss == te.loss && bit_identical(gg, ge));
  }
  CHECK(differing == 0);
  CHECK(cuda_graph_launches(*graphed) == 59);
}
