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
#include <string>
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

// `steps` training steps of backends a and b side by side on the same batches (seeds seed0,
// seed0 + 1, ...): loss terms, every gradient, the gradient norm and the parameters after each
// AdamW step must be bit-identical.
void check_identical_steps(Backend& a, Backend& b, const ModelCase& c, uint64_t seed0, int steps) {
  AdamWHyper h;
  for (int step = 0; step < steps; ++step) {
    INFO("step " << step);
    const HostBatch hb = make_batch(c, seed0 + step);
    const ForwardOptions opts = options_for(hb);
    const LossTerms ta = a.forward_backward(hb.view(), opts);
    const LossTerms tb = b.forward_backward(hb.view(), opts);
    CHECK(tb.loss == ta.loss);
    CHECK(tb.ce == ta.ce);
    CHECK(tb.barrier == ta.barrier);
    CHECK(tb.min_logdet == ta.min_logdet);
    std::vector<float> ga, gb;
    a.get_gradients(ga);
    b.get_gradients(gb);
    CHECK(bit_identical(gb, ga));
    const double na = a.grad_norm(), nb = b.grad_norm();
    CHECK(nb == na);
    a.adamw_step(h, 1e-2, clip_scale(na, 1.0));
    b.adamw_step(h, 1e-2, clip_scale(nb, 1.0));
    std::vector<float> pa, pb;
    a.get_parameters(pa);
    b.get_parameters(pb);
    CHECK(bit_identical(pb, pa));
  }
}

}  // namespace

TEST_CASE("cuda graphs: replayed training steps give the eager steps' bits", "[gpu][backend][graphs]") {
  const ModelCase c{"dh 32, 2 layers", model_config(67, 64, 2, 2, 16), 3, 13, {}, false};
  const ParamLayout layout(c.model);
  for (const char* precision : {"bf16", "fp32"}) {
    for (const double lambda : {0.0, 0.5}) {
      INFO(precision << ", lambda " << lambda);
      const std::vector<float> params = test_params(layout, 91);
      std::unique_ptr<Backend> eager = make_backend(c, lambda, precision, "0");
      std::unique_ptr<Backend> graphed = make_backend(c, lambda, precision, "1");
      eager->set_parameters(params);
      graphed->set_parameters(params);
      check_identical_steps(*eager, *graphed, c, 500, 5);
      // Two graphs a step (forward, backward).  Step 0 eager, step 1 captured and launched, steps
      // 2-4 replayed: 4 launches of each, none eager.
      CHECK(cuda_graph_launches(*graphed) == 8);
      CHECK(cuda_graph_launches(*eager) == 0);
    }
  }
  CHECK_THROWS_AS(make_backend(c, 0.0, "bf16", "yes"), ConfigError);
}

// BLM_BARRIER_STREAM=1 (the default): each layer's flash barrier on its own stream, beside the
// model's next kernels, must give the bits of the barrier on the step's one stream: the same
// kernels on the same data, only their order against the model's kernels changes.  bf16 (the
// flash barrier on the bf16 qkv), lambda 0.5, the exact barrier and a sampled one (a mask), eager
// and as CUDA graphs; four AdamW steps side by side, loss terms, gradients and parameters compared
// bit for bit, and the fork count checked so that the test cannot pass with the barrier left on
// the main stream.
TEST_CASE("barrier stream: the barrier beside the model gives the one-stream bits",
          "[gpu][backend][graphs]") {
  for (const bool masked : {false, true}) {
    const ModelCase c{"dh 32, 2 layers", model_config(67, 64, 2, 2, 16), 3, 13, {}, masked};
    const ParamLayout layout(c.model);
    for (const char* graphs : {"0", "1"}) {
      INFO((masked ? "sampled" : "exact") << " barrier, BLM_CUDA_GRAPHS=" << graphs);
      const std::vector<float> params = test_params(layout, 93);
      std::unique_ptr<Backend> one, two;
      {
        ScopedEnv env("BLM_BARRIER_STREAM", "0");
        one = make_backend(c, 0.5, "bf16", graphs);
      }
      {
        ScopedEnv env("BLM_BARRIER_STREAM", "1");
        two = make_backend(c, 0.5, "bf16", graphs);
      }
      one->set_parameters(params);
      two->set_parameters(params);
      check_identical_steps(*one, *two, c, 700, 4);
      // Both layers have the barrier: an eager or captured step forks twice, a replayed graph
      // forks nothing on the host.  Exact: steps 0 (eager) and 1 (captured), then replays.  A
      // mask is part of the graph's key, so sampled steps replay only where a key repeats.
      const long forks = cuda_barrier_stream_forks(*two);
      if (std::string(graphs) == "0")
        CHECK(forks == 8);
      else if (!masked)
        CHECK(forks == 4);
      else
        CHECK((forks >= 4 && forks <= 8));
      CHECK(cuda_barrier_stream_forks(*one) == 0);
      // The evaluation forward too.
      const HostBatch hb = make_batch(c, 720);
      CHECK(two->forward(hb.view(), options_for(hb)).loss ==
            one->forward(hb.view(), options_for(hb)).loss);
    }
  }
  // The default (unset) is the barrier's own stream; anything but 0 or 1 is refused.
  const ModelCase c{"dh 32, 2 layers", model_config(67, 64, 2, 2, 16), 3, 13, {}, false};
  {
    ScopedEnv env("BLM_BARRIER_STREAM", nullptr);
    std::unique_ptr<Backend> def = make_backend(c, 0.5, "bf16", "0");
    def->set_parameters(test_params(ParamLayout(c.model), 94));
    const HostBatch hb = make_batch(c, 730);
    def->forward_backward(hb.view(), options_for(hb));
    CHECK(cuda_barrier_stream_forks(*def) == 2);
  }
  ScopedEnv bad("BLM_BARRIER_STREAM", "2");
  CHECK_THROWS_AS(make_backend(c, 0.5, "bf16", "0"), ConfigError);
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
