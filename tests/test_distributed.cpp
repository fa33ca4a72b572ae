// Data-parallel training on the CPU side (no GPU needed):
//   - launch environments: torchrun-style, Open MPI, MPICH, Slurm (srun step vs sbatch script),
//     precedence, and one-line errors naming the variable; Slurm host lists; settings diffs;
//   - row sharding: the ranks' micro-batches cover the global batch exactly once;
//   - the one-GPU identity the design rests on (cmd/data_parallel.h), in float64 on the
//     reference model: the average over N ranks of the gradient of each rank's mean loss, with
//     grad_accum micro-batches, equals the full-batch gradient, for the exact barrier and the
//     sampled estimator (rel. error <= 1e-12; the barrier's share of the gradient is checked to
//     be large enough to matter);
//   - the rendezvous over loopback TCP and through a (stale, then fresh) rendezvous file: the
//     payload reaches every rank, a different config / world size / duplicate rank is refused
//     with one message naming it, timeouts name what is missing;
//   - barriers and their value comparison;
//   - failure detection in separate processes: a rank killed (SIGKILL) or stopped (SIGSTOP)
//     ends the other with a message naming it within the bound, a failure announced by one
//     rank reaches the other, a clean goodbye is no failure; the stall description names the
//     rank that has not issued a collective;
//   - the --gpus supervisor with /bin/sh workers: their environment, a killed worker stopping
//     the rest, SIGINT forwarded once;
//   - the program end to end without a GPU: --gpus refused with a clear message, and two
//     torchrun-style processes with different configs both exit naming the differing key.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cmd/data_parallel.h"
#include "cmd/launcher.h"
#include "cmd/positions.h"
#include "core/dist_control.h"
#include "core/dist_env.h"
#include "core/error.h"
#include "core/params.h"
#include "core/reference.h"
#include "core/rng.h"
#include "tests/catch.h"
#include "tests/cli_util.h"

namespace fs = std::filesystem;
using namespace blm;
using namespace blm::test;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// An environment made of a map.
EnvLookup fake_env(const std::map<std::string, std::string>& vars) {
  return [vars](const char* name) -> const char* {
    auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  };
}

std::string launch_error(const std::map<std::string, std::string>& vars) {
  try {
    detect_launch(fake_env(vars));
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

LaunchEnv loopback(int rank, int world, int port, double rendezvous_timeout = 20) {
  LaunchEnv e;
  e.rank = rank;
  e.world = world;
  e.local_rank = rank;
  e.local_world = world;
  e.master_addr = "127.0.0.1";
  e.master_port = port;
  e.launcher = "test";
  e.timeout_s = 5;
  e.rendezvous_timeout_s = rendezvous_timeout;
  return e;
}

// Joins `world` ranks in threads; returns each rank's channel or error message.
struct Joined {
  std::vector<std::unique_ptr<ControlChannel>> channels;
  std::vector<std::string> errors;
};
Joined join_all(const std::vector<LaunchEnv>& envs, const std::vector<std::string>& settings,
                const std::string& payload = "the payload") {
  Joined j;
  j.channels.resize(envs.size());
  j.errors.resize(envs.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < envs.size(); ++i)
    threads.emplace_back([&, i] {
      try {
        j.channels[i] = ControlChannel::join(envs[i], settings[i], [&] { return payload; });
      } catch (const std::exception& e) {
        j.errors[i] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  return j;
}

}  // namespace

// ------------------------------------------------------------------ launch environments

TEST_CASE("no launcher: one process", "[distributed]") {
  const LaunchEnv e = detect_launch(fake_env({}));
  CHECK(e.world == 1);
  CHECK(e.rank == 0);
  CHECK(e.launcher.empty());
  CHECK_FALSE(e.distributed());
  CHECK(e.timeout_s == 30);
  CHECK(e.rendezvous_timeout_s == 300);
}

TEST_CASE("torchrun-style variables", "[distributed]") {
  const LaunchEnv e = detect_launch(fake_env({{"RANK", "3"},
                                              {"WORLD_SIZE", "8"},
                                              {"LOCAL_RANK", "1"},
                                              {"LOCAL_WORLD_SIZE", "2"},
                                              {"MASTER_ADDR", "node7"},
                                              {"MASTER_PORT", "29501"},
                                              {"BLM_NCCL_TIMEOUT", "12.5"}}));
  CHECK(e.rank == 3);
  CHECK(e.world == 8);
  CHECK(e.local_rank == 1);
  CHECK(e.local_world == 2);
  CHECK(e.master_addr == "node7");
  CHECK(e.master_port == 29501);
  CHECK(e.timeout_s == 12.5);
  CHECK(e.launcher == "torchrun-style");
  CHECK_FALSE(e.spawned_by_gpus);
  CHECK(e.describe() ==
        "rank 3 of 8 (local rank 1), torchrun-style launch, rendezvous node7:29501");
  // What `--gpus` gives its workers.
  const LaunchEnv g = detect_launch(fake_env({{"RANK", "1"},
                                              {"WORLD_SIZE", "2"},
                                              {"LOCAL_RANK", "1"},
                                              {"MASTER_ADDR", "127.0.0.1"},
                                              {"MASTER_PORT", "4000"},
                                              {"BLM_GPUS_WORKER", "1"}}));
  CHECK(g.spawned_by_gpus);
  CHECK(g.launcher == "barrierlm --gpus");
  CHECK(g.local_world == 2);  // LOCAL_WORLD_SIZE absent: the world
  // Under torchrun its own store holds MASTER_PORT; BLM_RENDEZVOUS_PORT overrides any port.
  std::map<std::string, std::string> tr = {{"RANK", "0"}, {"WORLD_SIZE", "2"},
                                           {"LOCAL_RANK", "0"}, {"MASTER_ADDR", "n0"},
                                           {"MASTER_PORT", "29500"}, {"TORCHELASTIC_RUN_ID", "x"}};
  CHECK(detect_launch(fake_env(tr)).master_port == 29501);
  tr["BLM_RENDEZVOUS_PORT"] = "4444";
  CHECK(detect_launch(fake_env(tr)).master_port == 4444);
}

TEST_CASE("bad launch variables name the variable", "[distributed]") {
  const std::map<std::string, std::string> ok = {{"RANK", "1"},
                                                 {"WORLD_SIZE", "2"},
                                                 {"LOCAL_RANK", "1"},
                                                 {"MASTER_ADDR", "h"},
                                                 {"MASTER_PORT", "5000"}};
  auto with = [&](const std::string& k, const std::string& v) {
    auto m = ok;
    if (v.empty())
      m.erase(k);
    else
      m[k] = v;
    return m;
  };
  CHECK(launch_error(ok) == "(no error)");
  CHECK(launch_error(with("WORLD_SIZE", "")) == "environment variable WORLD_SIZE is not set");
  CHECK(launch_error(with("RANK", "2")) == "environment variable RANK=2 must be below WORLD_SIZE=2");
  CHECK(launch_error(with("RANK", "one")) == "environment variable RANK='one' is not an integer");
  CHECK(launch_error(with("WORLD_SIZE", "0")) ==
        "environment variable WORLD_SIZE=0 must be in [1, 1048576]");
  CHECK(contains(launch_error(with("LOCAL_RANK", "")),
                 "environment variable LOCAL_RANK is not set (RANK=1, WORLD_SIZE=2)"));
  CHECK(launch_error(with("MASTER_PORT", "70000")) ==
        "environment variable MASTER_PORT=70000 must be in [1, 65535]");
  CHECK(contains(launch_error(with("MASTER_ADDR", "")), "MASTER_ADDR is not set"));
  CHECK(contains(launch_error(with("BLM_NCCL_TIMEOUT", "-3")),
                 "BLM_NCCL_TIMEOUT='-3' must be a positive number of seconds"));
  // A rendezvous file replaces MASTER_ADDR / MASTER_PORT.
  auto file = with("MASTER_ADDR", "");
  file.erase("MASTER_PORT");
  file["BLM_RENDEZVOUS_FILE"] = "/shared/rdzv";
  CHECK(launch_error(file) == "(no error)");
  CHECK(detect_launch(fake_env(file)).rendezvous_file == "/shared/rdzv");
  // One process needs no rendezvous.
  CHECK(launch_error({{"RANK", "0"}, {"WORLD_SIZE", "1"}}) == "(no error)");
}

TEST_CASE("Open MPI, MPICH and Slurm variables", "[distributed]") {
  const LaunchEnv o = detect_launch(fake_env({{"OMPI_COMM_WORLD_RANK", "5"},
                                              {"OMPI_COMM_WORLD_SIZE", "16"},
                                              {"OMPI_COMM_WORLD_LOCAL_RANK", "5"},
                                              {"OMPI_COMM_WORLD_LOCAL_SIZE", "8"},
                                              {"MASTER_ADDR", "a"},
                                              {"MASTER_PORT", "6000"}}));
  CHECK(o.launcher == "Open MPI");
  CHECK((o.rank == 5 && o.world == 16 && o.local_rank == 5 && o.local_world == 8));
  // Open MPI gives no rank-0 address: the message says how to pass one.
  CHECK(contains(launch_error({{"OMPI_COMM_WORLD_RANK", "0"},
                               {"OMPI_COMM_WORLD_SIZE", "2"},
                               {"OMPI_COMM_WORLD_LOCAL_RANK", "0"}}),
                 "a Open MPI launch of 2 ranks needs rank 0's address"));
  const LaunchEnv m = detect_launch(fake_env({{"PMI_RANK", "1"},
                                              {"PMI_SIZE", "4"},
                                              {"MPI_LOCALRANKID", "1"},
                                              {"MPI_LOCALNRANKS", "2"},
                                              {"BLM_RENDEZVOUS_FILE", "/x"}}));
  CHECK((m.launcher == "MPICH" && m.rank == 1 && m.world == 4 && m.local_rank == 1));
  const std::map<std::string, std::string> slurm = {{"SLURM_PROCID", "6"},
                                                    {"SLURM_STEP_NUM_TASKS", "8"},
                                                    {"SLURM_NTASKS", "8"},
                                                    {"SLURM_LOCALID", "2"},
                                                    {"SLURM_STEP_NODELIST", "gpu[017-018]"},
                                                    {"SLURM_JOB_ID", "123456"},
                                                    {"SLURM_STEP_ID", "2"}};
  const LaunchEnv s = detect_launch(fake_env(slurm));
  CHECK(s.launcher == "Slurm");
  CHECK((s.rank == 6 && s.world == 8 && s.local_rank == 2));
  CHECK(s.master_addr == "gpu017");
  CHECK(s.master_port == 20000 + (123456 + 131 * 2) % 20000);
  // MASTER_ADDR / MASTER_PORT win over the derived ones.
  auto slurm2 = slurm;
  slurm2["MASTER_ADDR"] = "login";
  slurm2["MASTER_PORT"] = "1234";
  const LaunchEnv s2 = detect_launch(fake_env(slurm2));
  CHECK((s2.master_addr == "login" && s2.master_port == 1234));
  // An sbatch script (no srun step) is one process, whatever SLURM_NTASKS says.
  const LaunchEnv batch = detect_launch(
      fake_env({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "0"}}));
  CHECK(batch.world == 1);
  CHECK(batch.launcher.empty());
  // RANK / WORLD_SIZE take precedence over the MPI variables (torchrun inside an srun step).
  auto both = slurm;
  both["RANK"] = "13";
  both["WORLD_SIZE"] = "16";
  both["LOCAL_RANK"] = "5";
  both["MASTER_ADDR"] = "gpu017";
  both["MASTER_PORT"] = "29500";
  CHECK(detect_launch(fake_env(both)).launcher == "torchrun-style");
}

TEST_CASE("a launcher set with more ranks than the winner's is a conflict", "[distributed]") {
  // A RANK=0 WORLD_SIZE=1 left in the shell under mpirun -np 2: each rank would train alone.
  std::map<std::string, std::string> vars = {{"RANK", "0"},
                                             {"WORLD_SIZE", "1"},
                                             {"OMPI_COMM_WORLD_RANK", "1"},
                                             {"OMPI_COMM_WORLD_SIZE", "2"},
                                             {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}};
  const std::string err = launch_error(vars);
  CHECK(contains(err, "conflicting launch variables: RANK=0, WORLD_SIZE=1 (torchrun-style"));
  CHECK(contains(err, "OMPI_COMM_WORLD_RANK=1, OMPI_COMM_WORLD_SIZE=2 (Open MPI)"));
  // Sets that agree: the first one present wins, as documented.
  vars["RANK"] = "1";
  vars["WORLD_SIZE"] = "2";
  vars["LOCAL_RANK"] = "1";
  vars["MASTER_ADDR"] = "h";
  vars["MASTER_PORT"] = "5000";
  CHECK(detect_launch(fake_env(vars)).launcher == "torchrun-style");
  // A nested launch (torchrun started by mpirun on each node) has more inner ranks: allowed.
  vars["RANK"] = "9";
  vars["WORLD_SIZE"] = "16";
  CHECK(detect_launch(fake_env(vars)).rank == 9);
  // An outer set that is malformed is named too.
  vars["PMI_SIZE"] = "x";
  CHECK(contains(launch_error(vars), "PMI_RANK is not set"));
  vars["PMI_RANK"] = "0";
  CHECK(contains(launch_error(vars), "PMI_SIZE='x' is not an integer"));
}

TEST_CASE("an MPI launch with rank or size alone names the missing one", "[distributed]") {
  CHECK(launch_error({{"PMI_SIZE", "2"}}) == "environment variable PMI_RANK is not set");
  CHECK(launch_error({{"PMI_RANK", "1"}}) == "environment variable PMI_SIZE is not set");
  CHECK(launch_error({{"OMPI_COMM_WORLD_RANK", "1"}}) ==
        "environment variable OMPI_COMM_WORLD_SIZE is not set");
}

TEST_CASE("MASTER_PORT 65535 under torchrun is refused; LOCAL_WORLD_SIZE above the world",
          "[distributed]") {
  std::map<std::string, std::string> tr = {{"RANK", "0"},        {"WORLD_SIZE", "2"},
                                           {"LOCAL_RANK", "0"},  {"MASTER_ADDR", "n0"},
                                           {"MASTER_PORT", "65535"}, {"TORCHELASTIC_RUN_ID", "x"}};
  const std::string err = launch_error(tr);
  CHECK(contains(err, "MASTER_PORT=65535: under torchrun"));
  CHECK(contains(err, "MASTER_PORT + 1"));
  tr["BLM_RENDEZVOUS_PORT"] = "4444";  // the port is given: nothing to shift
  CHECK(detect_launch(fake_env(tr)).master_port == 4444);
  tr.erase("BLM_RENDEZVOUS_PORT");
  tr["WORLD_SIZE"] = "1";  // one process meets nobody
  CHECK(launch_error(tr) == "(no error)");
  CHECK(launch_error({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"},
                      {"LOCAL_WORLD_SIZE", "4"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}}) ==
        "environment variable LOCAL_WORLD_SIZE=4 must not exceed WORLD_SIZE=2");
}

TEST_CASE("first host of a Slurm node list", "[distributed]") {
  CHECK(first_slurm_host("gpu001") == "gpu001");
  CHECK(first_slurm_host("gpu[003-010,012],login") == "gpu003");
  CHECK(first_slurm_host("a1,b2") == "a1");
  CHECK(first_slurm_host("rack[1-2]-n[07,9]") == "rack1-n07");
  CHECK(first_slurm_host("n[0099]x") == "n0099x");
  for (const char* bad : {"gpu[1-2", "gpu]", "[x]", ",a", ""}) {
    INFO(bad);
    CHECK_THROWS_AS(first_slurm_host(bad), ConfigError);
  }
}

TEST_CASE("first_difference names the key that differs", "[distributed]") {
  const std::string a = "model:\n  n_layer: 2\ntrain:\n  lr: 0.001\n  steps: 10\n";
  CHECK(first_difference(a, "rank 1", a, "rank 0").empty());
  const std::string b = "model:\n  n_layer: 2\ntrain:\n  lr: 0.002\n  steps: 10\n";
  CHECK(first_difference(b, "rank 1", a, "rank 0") ==
        "train.lr is 0.002 on rank 1 but 0.001 on rank 0");
  CHECK(first_difference(a + "run:\n  until: 5\n", "rank 2", a, "rank 0") ==
        "'run:' is missing on rank 0");
  CHECK(first_difference("x\n", "rank 1", "y\n", "rank 0") == "'x' on rank 1 but 'y' on rank 0");
}

TEST_CASE("fnv1a64 and the replica hash", "[distributed]") {
  CHECK(fnv1a64("", 0) == 0xcbf29ce484222325ull);
  CHECK(fnv1a64("a", 1) == 0xaf63dc4c8601ec8cull);  // the published FNV-1a test vector
  std::vector<float> p(1001);
  for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<float>(normal01(7, i));
  const uint64_t h = replica_hash(p);
  CHECK(replica_hash(p) == h);
  for (size_t i : {size_t(0), size_t(500), size_t(1000)}) {  // one ulp anywhere, the odd tail too
    std::vector<float> q = p;
    q[i] = std::nextafter(q[i], 1e9f);
    CHECK(replica_hash(q) != h);
  }
  std::vector<float> swapped = p;
  std::swap(swapped[3], swapped[4]);
  CHECK(replica_hash(swapped) != h);
}

// ------------------------------------------------------------------ sharding and the identity

TEST_CASE("ranks and micro-batches cover the global batch exactly once", "[distributed]") {
  for (int world : {1, 2, 3, 4, 8})
    for (int accum : {1, 2, 3})
      for (int per : {1, 2, 5}) {
        const int B = world * accum * per;
        const ShardPlan p = shard_rows(B, accum, world);
        CHECK(p.micro_rows == per);
        std::vector<int> seen(B, 0);
        for (int r = 0; r < world; ++r)
          for (int i = 0; i < accum; ++i)
            for (int k = 0; k < p.micro_rows; ++k) ++seen.at(p.row0(r, i) + k);
        CHECK(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
      }
  try {
    shard_rows(12, 2, 4);
    FAIL("no error");
  } catch (const ConfigError& e) {
    CHECK(std::string(e.what()) ==
          "train.batch_size (12) must be divisible by train.grad_accum x the number of GPUs "
          "(2 x 4 = 8)");
  }
}

namespace {

// Random parameters with the qkv weights scaled so the Jacobians are well away from I (the
// barrier and its gradient are then large enough to test), biases and LN gains not 0 / 1.
std::vector<double> identity_params(const ParamLayout& layout, uint64_t seed) {
  const std::vector<float> init = init_parameters(layout, seed);
  std::vector<double> p(init.begin(), init.end());
  const double qkv_std = std::sqrt(0.3 / layout.config().d_model);
  for (size_t ti = 0; ti < layout.tensors().size(); ++ti) {
    const TensorSpec& t = layout.tensors()[ti];
    for (size_t i = 0; i < t.size; ++i) {
      const double z = normal01(hash2(seed, ti), i);
      double& x = p[t.offset + i];
      if (t.name.find("attn.qkv.w") != std::string::npos) x = qkv_std * z;
      else if (t.shape.size() == 1) x += 0.1 * z;
    }
  }
  return p;
}

// Gradient of the mean loss over rows [row0, row0 + B) of a step, accumulated in grads with
// weight `scale` (how the trainer drives one micro-batch).
double shard_gradient(ReferenceModel<double>& model, const std::vector<double>& params,
                      const std::vector<int32_t>& tokens, int T, int row0, int B, int K,
                      double scale, bool accumulate, std::vector<double>& grads) {
  const auto first = tokens.begin() + static_cast<long>(row0) * (T + 1);
  std::vector<int32_t> in, tgt;
  for (int b = 0; b < B; ++b) {
    in.insert(in.end(), first + b * (T + 1), first + b * (T + 1) + T);
    tgt.insert(tgt.end(), first + b * (T + 1) + 1, first + (b + 1) * (T + 1));
  }
  std::vector<uint8_t> mask;
  ForwardOptions fo;
  if (K > 0) {
    sample_barrier_mask(/*seed=*/99, /*step=*/4, row0, B, T, K, mask);
    fo.barrier_mask = mask.data();
  }
  fo.grad_scale = static_cast<float>(scale);
  fo.accumulate = accumulate;
  const LossTerms lt = model.forward(params.data(), Batch{B, T, in.data(), tgt.data()}, fo);
  model.backward(params.data(), grads.data());
  return lt.loss;
}

double rel_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / den);
}

}  // namespace

TEST_CASE("N ranks' averaged gradients equal the one-GPU gradient (float64 reference)",
          "[distributed]") {
  ModelConfig m;
  m.vocab_size = 29;
  m.d_model = 32;
  m.n_head = 2;
  m.n_layer = 2;
  m.seq_len = 12;
  const int T = m.seq_len, B = 8;
  for (int K : {0, 3}) {  // exact barrier; K sampled positions per row
    BarrierConfig bar;
    bar.lambda = 0.5;
    bar.positions = K;
    ReferenceModel<double> model(m, bar);
    const std::vector<double> params = identity_params(model.layout(), 11 + K);
    std::vector<int32_t> tokens(static_cast<size_t>(B) * (T + 1));
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>(hash2(5 + K, i) % 29);
    const size_t P = model.layout().total();
    std::vector<double> full(P);
    const double full_loss = shard_gradient(model, params, tokens, T, 0, B, K, 1.0, false, full);

    // The barrier must matter, or this test could not catch a wrong N_R normalisation.
    BarrierConfig off = bar;
    off.lambda = 0;
    ReferenceModel<double> ce_only(m, off);
    std::vector<double> ce_grad(P);
    shard_gradient(ce_only, params, tokens, T, 0, B, K, 1.0, false, ce_grad);
    CHECK(rel_diff(ce_grad, full) > 1e-3);

    for (int world : {2, 4})
      for (int accum : {1, 2}) {
        const ShardPlan plan = shard_rows(B, accum, world);
        std::vector<double> avg(P, 0.0), rank_grad(P);
        double loss = 0;
        for (int r = 0; r < world; ++r) {
          for (int i = 0; i < accum; ++i)
            loss += shard_gradient(model, params, tokens, T, plan.row0(r, i), plan.micro_rows, K,
                                   1.0 / accum, i > 0, rank_grad) /
                    (accum * world);
          for (size_t j = 0; j < P; ++j) avg[j] += rank_grad[j] / world;  // ncclAvg
        }
        INFO("K " << K << ", " << world << " ranks, grad_accum " << accum);
        CHECK(rel_diff(avg, full) < 1e-12);
        CHECK(std::fabs(loss - full_loss) < 1e-12 * std::fabs(full_loss));
      }
  }
}

// ------------------------------------------------------------------ rendezvous

TEST_CASE("loopback rendezvous: payload to every rank, barriers compare values", "[distributed]") {
  const int port = free_local_port();
  std::vector<LaunchEnv> envs;
  for (int r = 0; r < 3; ++r) envs.push_back(loopback(r, 3, port));
  const std::string settings = "model:\n  n_layer: 2\n";
  Joined j = join_all(envs, {settings, settings, settings}, std::string("id\0with nul", 11));
  for (int r = 0; r < 3; ++r) {
    INFO("rank " << r << ": " << j.errors[r]);
    REQUIRE(j.channels[r] != nullptr);
    CHECK(j.channels[r]->payload() == std::string("id\0with nul", 11));
    CHECK(j.channels[r]->rank() == r);
    CHECK(j.channels[r]->world_size() == 3);
  }
  auto barrier_all = [&](const std::vector<uint64_t>& values, const std::string& what) {
    std::vector<std::string> diffs(3);
    std::vector<std::thread> t;
    for (int r = 0; r < 3; ++r)
      t.emplace_back([&, r] { diffs[r] = j.channels[r]->barrier(what, values[r], 20); });
    for (auto& x : t) x.join();
    return diffs;
  };
  for (const std::string& d : barrier_all({7, 7, 7}, "step 1")) CHECK(d.empty());
  // Rank 2's value differs: every rank hears it, named.
  for (const std::string& d : barrier_all({7, 7, 8}, "step 2"))
    CHECK(d == "rank 2 has 0000000000000008 but rank 0 has 0000000000000007 at 'step 2'");
  // Ranks at different barriers is a bug the message shows.
  std::vector<std::string> diffs(3);
  std::vector<std::thread> t;
  for (int r = 0; r < 3; ++r)
    t.emplace_back([&, r] { diffs[r] = j.channels[r]->barrier(r == 1 ? "eval" : "save", 0, 20); });
  for (auto& x : t) x.join();
  CHECK(diffs[0] == "rank 1 is at 'eval' but rank 0 at 'save'");
  // Clean goodbyes (destruction in any order) end nobody's process.
  j.channels[1].reset();
  j.channels[0].reset();
  j.channels[2].reset();
}

TEST_CASE("rendezvous refusals name the problem on every rank", "[distributed]") {
  const std::string a = "train:\n  lr: 0.001\n", b = "train:\n  lr: 0.002\n";
  {
    const int port = free_local_port();
    Joined j = join_all({loopback(0, 2, port), loopback(1, 2, port)}, {a, b});
    const std::string want =
        "rank 1's settings differ from rank 0's: train.lr is 0.002 on rank 1 but 0.001 on "
        "rank 0 (every rank must run the same config)";
    CHECK(j.errors[0] == want);
    CHECK(j.errors[1] == want);
  }
  {
    const int port = free_local_port();
    Joined j = join_all({loopback(0, 3, port), loopback(1, 2, port)}, {a, a});
    CHECK(contains(j.errors[0], "has a world size of 2 but rank 0 has 3"));
    CHECK(contains(j.errors[1], "has a world size of 2 but rank 0 has 3"));
  }
  {
    const int port = free_local_port();
    std::vector<LaunchEnv> envs = {loopback(0, 3, port), loopback(1, 3, port), loopback(1, 3, port)};
    Joined j = join_all(envs, {a, a, a});
    CHECK(contains(j.errors[0], "rank 1 joined twice"));
    CHECK(contains(j.errors[1] + j.errors[2], "rank 1 joined twice"));
  }
  {
    // Rank 0's payload fails (say NCCL cannot load): every rank gets its message.
    const int port = free_local_port();
    Joined j;
    j.errors.resize(2);
    std::thread t0([&] {
      try {
        ControlChannel::join(loopback(0, 2, port), a, []() -> std::string {
          throw DeviceError("cannot load NCCL (test)");
        });
      } catch (const std::exception& e) {
        j.errors[0] = e.what();
      }
    });
    std::thread t1([&] {
      try {
        ControlChannel::join(loopback(1, 2, port), a, [] { return std::string(); });
      } catch (const std::exception& e) {
        j.errors[1] = e.what();
      }
    });
    t0.join();
    t1.join();
    CHECK(j.errors[0] == "cannot load NCCL (test)");
    CHECK(j.errors[1] == "rank 0 failed: cannot load NCCL (test)");
  }
}

TEST_CASE("rendezvous timeouts say what is missing", "[distributed]") {
  const int port = free_local_port();
  const auto t0 = Clock::now();
  Joined alone = join_all({loopback(0, 3, port, 1.0)}, {"x"});
  CHECK(contains(alone.errors[0], "timed out after 1 s waiting for rank(s) 1, 2 to join the "
                                  "rendezvous on port " + std::to_string(port)));
  Joined nobody = join_all({loopback(1, 2, free_local_port(), 1.0)}, {"x"});
  CHECK(contains(nobody.errors[0], "rank 1 could not join the rendezvous at 127.0.0.1:"));
  CHECK(contains(nobody.errors[0], "within 1 s"));
  CHECK(seconds_since(t0) < 10);
}

TEST_CASE("file rendezvous, with a stale file left by an earlier run", "[distributed]") {
  TempDir dir;
  const std::string file = dir.path + "/rdzv";
  {
    // An earlier run's file: a port nobody listens on and an old nonce.
    std::ofstream out(file);
    out << "barrierlm-rendezvous 1\nhost 127.0.0.1\nport " << free_local_port()
        << "\nnonce 0123456789abcdef\nworld 2\n";
  }
  std::vector<LaunchEnv> envs = {loopback(0, 2, 0), loopback(1, 2, 0)};
  for (LaunchEnv& e : envs) {
    e.master_addr = "127.0.0.1";  // what rank 0 publishes (its host name may not resolve here)
    e.master_port = 0;
    e.rendezvous_file = file;
  }
  // Rank 1 starts first and meets the stale file; rank 0 replaces it a moment later.
  Joined j;
  j.channels.resize(2);
  j.errors.resize(2);
  std::thread t1([&] {
    try {
      j.channels[1] = ControlChannel::join(envs[1], "s", [] { return std::string(); });
    } catch (const std::exception& e) {
      j.errors[1] = e.what();
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  std::thread t0([&] {
    try {
      j.channels[0] = ControlChannel::join(envs[0], "s", [] { return std::string("file id"); });
    } catch (const std::exception& e) {
      j.errors[0] = e.what();
    }
  });
  t0.join();
  t1.join();
  INFO(j.errors[0] << " | " << j.errors[1]);
  REQUIRE(j.channels[0]);
  REQUIRE(j.channels[1]);
  CHECK(j.channels[1]->payload() == "file id");
  CHECK(contains(slurp(file), "barrierlm-rendezvous 1\nhost 127.0.0.1\nport "));
  j.channels[1].reset();
  j.channels[0].reset();
  CHECK_FALSE(fs::exists(file));  // rank 0 removes it when the run ends
}

// ------------------------------------------------------------------ failures, in processes

namespace {

// Runs body() in a child process with stderr in `err_path`; the child exits with its result.
pid_t fork_rank(const std::string& err_path, const std::function<int()>& body) {
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    const int fd = open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 2);
    int rc = 99;
    try {
      rc = body();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "child error: %s\n", e.what());
      rc = 98;
    }
    std::fflush(stderr);
    _exit(rc);
  }
  return pid;
}

// Waits for pid at most `limit` seconds; returns its wait status, or -1 after killing it.
int wait_for(pid_t pid, double limit) {
  const auto t0 = Clock::now();
  int st = 0;
  while (seconds_since(t0) < limit) {
    if (waitpid(pid, &st, WNOHANG) == pid) return st;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  kill(pid, SIGKILL);
  waitpid(pid, &st, 0);
  return -1;
}

// The usual two-process setup: rank 1 runs `one`, rank 0 `zero`, both joined first.
struct TwoRanks {
  TempDir dir;
  pid_t p0 = -1, p1 = -1;
  std::string err0, err1;
  TwoRanks(const std::function<int(ControlChannel&)>& zero,
           const std::function<int(ControlChannel&)>& one, double timeout_s) {
    const int port = free_local_port();
    err0 = dir.path + "/err0";
    err1 = dir.path + "/err1";
    auto body = [&](int rank, const std::function<int(ControlChannel&)>& f) {
      return [=]() {
        LaunchEnv e = loopback(rank, 2, port);
        e.timeout_s = timeout_s;
        auto c = ControlChannel::join(e, "same", [] { return std::string("id"); });
        return f(*c);
      };
    };
    p0 = fork_rank(err0, body(0, zero));
    p1 = fork_rank(err1, body(1, one));
  }
};

}  // namespace

TEST_CASE("a rank killed mid-run ends the other within seconds, naming it", "[distributed]") {
  TwoRanks run(
      [](ControlChannel&) {
        std::this_thread::sleep_for(std::chrono::seconds(60));  // "training"
        return 0;
      },
      [](ControlChannel&) {
        std::this_thread::sleep_for(std::chrono::milliseconds(500));
        raise(SIGKILL);
        return 0;
      },
      30);
  const auto t0 = Clock::now();
  const int st1 = wait_for(run.p1, 20);
  const int st0 = wait_for(run.p0, 20);
  const double took = seconds_since(t0);
  CHECK((WIFSIGNALED(st1) && WTERMSIG(st1) == SIGKILL));
  REQUIRE(st0 != -1);
  CHECK((WIFEXITED(st0) && WEXITSTATUS(st0) == 1));
  const std::string err = slurp(run.err0);
  INFO(err);
  CHECK(contains(err, "barrierlm: error: rank 1 ("));
  CHECK(contains(err, ") exited unexpectedly (its connection closed); aborting"));
  CHECK(took < 10);  // the death is seen at once, not after the 30 s timeout
}

TEST_CASE("a stopped (hung) rank is caught by the heartbeat timeout", "[distributed]") {
  TwoRanks run(
      [](ControlChannel&) {
        std::this_thread::sleep_for(std::chrono::seconds(60));
        return 0;
      },
      [](ControlChannel&) {
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        raise(SIGSTOP);  // the whole process freezes, heartbeats included
        return 0;
      },
      2.0);
  const auto t0 = Clock::now();
  const int st0 = wait_for(run.p0, 20);
  const double took = seconds_since(t0);
  kill(run.p1, SIGKILL);
  wait_for(run.p1, 5);
  REQUIRE(st0 != -1);
  CHECK((WIFEXITED(st0) && WEXITSTATUS(st0) == 1));
  const std::string err = slurp(run.err0);
  INFO(err);
  CHECK(contains(err, "stopped responding (no heartbeat for 2 s); aborting"));
  CHECK(took >= 2.0);
  CHECK(took < 8);
}

TEST_CASE("a failure one rank announces ends the other with its message", "[distributed]") {
  TwoRanks run(
      [](ControlChannel&) {
        std::this_thread::sleep_for(std::chrono::seconds(60));
        return 0;
      },
      [](ControlChannel& c) {
        c.announce_failure("data file 'x.bin' is truncated");
        return 3;
      },
      30);
  const int st1 = wait_for(run.p1, 20);
  const int st0 = wait_for(run.p0, 20);
  CHECK((WIFEXITED(st1) && WEXITSTATUS(st1) == 3));  // the failing rank exits its own way
  REQUIRE(st0 != -1);
  CHECK((WIFEXITED(st0) && WEXITSTATUS(st0) == 1));
  CHECK(contains(slurp(run.err0),
                 "barrierlm: error: rank 1 failed: data file 'x.bin' is truncated; aborting"));
  // And from rank 0 to the others.
  TwoRanks back(
      [](ControlChannel& c) {
        c.announce_failure("training diverged at step 3");
        return 4;
      },
      [](ControlChannel&) {
        std::this_thread::sleep_for(std::chrono::seconds(60));
        return 0;
      },
      30);
  CHECK(WEXITSTATUS(wait_for(back.p0, 20)) == 4);
  const int st = wait_for(back.p1, 20);
  INFO(slurp(back.err1));
  REQUIRE(st != -1);
  CHECK(WEXITSTATUS(st) == 1);
  CHECK(contains(slurp(back.err1),
                 "barrierlm: error: rank 0 failed: training diverged at step 3; aborting"));
}

TEST_CASE("clean goodbyes, and a stall named by the heartbeats' progress", "[distributed]") {
  TwoRanks run(
      [](ControlChannel& c) {
        dist_note_progress(7);
        std::this_thread::sleep_for(std::chrono::milliseconds(2500));  // heartbeats flow
        const std::string stall = dist_describe_stall(6, 30);
        std::fprintf(stderr, "stall: %s\n", stall.c_str());
        const std::string all_issued = dist_describe_stall(5, 31);
        std::fprintf(stderr, "all: %s\n", all_issued.c_str());
        c.barrier("end", 1);
        return 0;
      },
      [](ControlChannel& c) {
        dist_note_progress(5);
        c.barrier("end", 1);
        return 0;
      },
      30);
  const int st0 = wait_for(run.p0, 20), st1 = wait_for(run.p1, 20);
  CHECK((WIFEXITED(st0) && WEXITSTATUS(st0) == 0));
  CHECK((WIFEXITED(st1) && WEXITSTATUS(st1) == 0));
  const std::string err = slurp(run.err0);
  INFO(err);
  CHECK(contains(err, "stall: rank 1 stopped responding (no progress for 30 s: it issued 5 "
                      "collectives, rank 0 waits on #6)\n"));
  CHECK(contains(err, "all: collective #5 did not complete although every rank issued it (no "
                      "progress for 31 s;"));
  CHECK_FALSE(contains(slurp(run.err1), "error"));
}

// ------------------------------------------------------------------ the --gpus supervisor

namespace {

// Runs launch_local_workers with stderr captured.
int launch_captured(const LocalLaunch& l, std::string& err) {
  TempDir dir;
  const std::string path = dir.path + "/stderr";
  std::fflush(stderr);
  const int saved = dup(2);
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  dup2(fd, 2);
  close(fd);
  int rc = -1;
  try {
    rc = launch_local_workers(l);
  } catch (...) {
    std::fflush(stderr);
    dup2(saved, 2);
    close(saved);
    throw;
  }
  std::fflush(stderr);
  dup2(saved, 2);
  close(saved);
  err = slurp(path);
  return rc;
}

}  // namespace

TEST_CASE("--gpus workers get the launch variables", "[distributed]") {
  TempDir dir;
  LocalLaunch l;
  l.workers = 3;
  l.program = "/bin/sh";
  l.args = {"-c", "echo \"$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR "
                  "$BLM_GPUS_WORKER $NCCL_NVLS_ENABLE ${BLM_RENDEZVOUS_FILE:-none} $MASTER_PORT\" > " +
                      dir.path + "/w$RANK"};
  setenv("BLM_RENDEZVOUS_FILE", "/should/not/reach/workers", 1);
  std::string err;
  const int rc = launch_captured(l, err);
  unsetenv("BLM_RENDEZVOUS_FILE");
  CHECK(rc == 0);
  CHECK(err.empty());
  std::string port;
  for (int r = 0; r < 3; ++r) {
    std::istringstream in(slurp(dir.path + "/w" + std::to_string(r)));
    std::string rank, world, local, local_world, addr, worker, nvls, file, p;
    in >> rank >> world >> local >> local_world >> addr >> worker >> nvls >> file >> p;
    CHECK(rank == std::to_string(r));
    CHECK(world == "3");
    CHECK(local == std::to_string(r));
    CHECK(local_world == "3");
    CHECK(addr == "127.0.0.1");
    CHECK(worker == "1");
    CHECK(nvls == (std::getenv("NCCL_NVLS_ENABLE") ? std::getenv("NCCL_NVLS_ENABLE") : "0"));
    CHECK(file == "none");
    if (r == 0) port = p;
    CHECK(p == port);  // one rendezvous port for all
  }
  CHECK(std::stoi(port) > 0);
}

TEST_CASE("--gpus workers get none of the parent's rendezvous variables", "[distributed]") {
  TempDir dir;
  LocalLaunch l;
  l.workers = 2;
  l.program = "/bin/sh";
  std::string echo = "echo";
  for (const std::string& v : rendezvous_variables()) echo += " " + v + "=${" + v + ":-none}";
  l.args = {"-c", echo + " > " + dir.path + "/w$RANK"};
  const std::map<std::string, std::string> parent = {
      {"BLM_RENDEZVOUS_PORT", "4444"}, {"TORCHELASTIC_RUN_ID", "elastic-1"},
      {"BLM_RENDEZVOUS_HOST", "elsewhere"}, {"BLM_RENDEZVOUS_FILE", "/shared/rdzv"}};
  for (const auto& [k, v] : parent) setenv(k.c_str(), v.c_str(), 1);
  std::string err;
  const int rc = launch_captured(l, err);
  for (const auto& kv : parent) unsetenv(kv.first.c_str());
  CHECK(rc == 0);
  for (int r = 0; r < 2; ++r) {
    const std::string seen = slurp(dir.path + "/w" + std::to_string(r));
    for (const auto& kv : parent) CHECK(contains(seen, kv.first + "=none"));
    CHECK(contains(seen, "MASTER_ADDR=127.0.0.1"));
  }
}

TEST_CASE("--gpus: a killed worker stops the others, and is named", "[distributed]") {
  LocalLaunch l;
  l.workers = 3;
  l.program = "/bin/sh";
  l.grace_s = 1;
  l.args = {"-c", "if [ \"$RANK\" = 1 ]; then sleep 0.3; kill -9 $$; fi; sleep 30"};
  std::string err;
  const auto t0 = Clock::now();
  const int rc = launch_captured(l, err);
  CHECK(rc == 1);
  CHECK(seconds_since(t0) < 6);  // the others were killed after the 1 s grace
  CHECK(contains(err, "barrierlm: error: rank 1 (pid "));
  CHECK(contains(err, ") was killed by signal 9 ("));
  CHECK(contains(err, "; stopping the other ranks\n"));
  // A worker that fails by itself.
  l.args = {"-c", "if [ \"$RANK\" = 2 ]; then exit 3; fi; sleep 30"};
  CHECK(launch_captured(l, err) == 1);
  CHECK(contains(err, "rank 2 (pid "));
  CHECK(contains(err, ") exited with status 3; stopping the other ranks"));
}

TEST_CASE("--gpus forwards SIGINT once; the workers' 130 becomes the status", "[distributed]") {
  TempDir dir;
  LocalLaunch l;
  l.workers = 2;
  l.program = "/bin/sh";
  // Each worker counts the SIGINTs it gets for 1.5 s, then exits 130 (a saved interrupt).
  l.args = {"-c", "n=0; trap 'n=$((n+1))' INT; i=0; while [ $i -lt 15 ]; do sleep 0.1; "
                  "i=$((i+1)); done; echo $n > " + dir.path + "/n$RANK; exit 130"};
  std::thread sender([] {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    kill(getpid(), SIGINT);  // as a terminal's Ctrl-C would reach the parent
  });
  std::string err;
  const int rc = launch_captured(l, err);
  sender.join();
  CHECK(rc == 130);
  CHECK(slurp(dir.path + "/n0") == "1\n");
  CHECK(slurp(dir.path + "/n1") == "1\n");
}

TEST_CASE("describe_exit", "[distributed]") {
  CHECK(describe_exit(3 << 8) == "exited with status 3");
  CHECK(contains(describe_exit(SIGKILL), "was killed by signal 9 ("));
}

// ------------------------------------------------------------------ the program, no GPU

namespace {

void write_tiny_run(const std::string& dir) {
  std::ofstream text(dir + "/text.txt");
  for (int i = 0; i < 400; ++i) text << "the quick brown fox " << i << " jumps over the lazy dog\n";
  std::ofstream cfg(dir + "/cfg.yaml");
  cfg << "model: {n_layer: 1, n_head: 1, d_model: 32, seq_len: 16, vocab_size: 0}\n"
         "data: {train: text.txt, tokenizer: byte}\n"
         "train: {batch_size: 4, steps: 2, eval_interval: 0, out_dir: runs, run_name: r}\n"
         "device: {backend: auto, precision: fp32}\n";
}

}  // namespace

TEST_CASE("program: --gpus and launcher errors are one clear line", "[distributed]") {
  TempDir dir;
  write_tiny_run(dir.path);
  const std::string out = dir.path + "/out";
  // The CPU backend cannot train on several GPUs: refused before anything starts.
  pid_t p = spawn_barrierlm(dir.path, {"train", "cfg.yaml", "--gpus", "2", "--set", "device.backend=cpu"},
                            out, out);
  int st = wait_for(p, 60);
  CHECK((WIFEXITED(st) && WEXITSTATUS(st) == 1));
  CHECK(slurp(out) == "barrierlm: error: device.gpus = 2 needs the CUDA backend but "
                      "device.backend is 'cpu'; use device.backend=cuda or auto, or --gpus 1\n");
  // batch_size must split over the GPUs.
  p = spawn_barrierlm(dir.path, {"train", "cfg.yaml", "--gpus", "3"}, out, out);
  st = wait_for(p, 60);
  CHECK((WIFEXITED(st) && WEXITSTATUS(st) == 1));
  CHECK(contains(slurp(out), "train.batch_size (4) must be divisible by train.grad_accum x "
                             "device.gpus (1 x 3 = 3)"));
  // --gpus under a launcher is a usage error.
  p = spawn_barrierlm(dir.path, {"train", "cfg.yaml", "--gpus", "2"}, out, out,
                      {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"},
                       {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "1"}});
  st = wait_for(p, 60);
  CHECK((WIFEXITED(st) && WEXITSTATUS(st) == 2));
  CHECK(contains(slurp(out), "barrierlm: error: --gpus starts its own workers and cannot run "
                             "under a launcher (torchrun-style: rank 0 of 2"));
  // A malformed launcher variable.
  p = spawn_barrierlm(dir.path, {"train", "cfg.yaml"}, out, out, {{"RANK", "0"}, {"WORLD_SIZE", "two"}});
  st = wait_for(p, 60);
  CHECK((WIFEXITED(st) && WEXITSTATUS(st) == 1));
  CHECK(slurp(out) == "barrierlm: error: environment variable WORLD_SIZE='two' is not an integer\n");
}

namespace {

// A finished `barrierlm` of the program tests: wait status (-1: killed after the limit), output.
struct Ended {
  int status = -1;
  std::string out;
  double seconds = 0;
  bool failed() const { return status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 1; }
};

// `barrierlm train cfg.yaml ARGS` in dir (write_tiny_run) with the extra environment `env`.
Ended train_with(const TempDir& dir, std::vector<std::string> args,
                 const std::map<std::string, std::string>& env, double limit = 60) {
  args.insert(args.begin(), {"train", "cfg.yaml"});
  const std::string out = dir.path + "/out";
  const auto t0 = Clock::now();
  Ended e;
  e.status = wait_for(spawn_barrierlm(dir.path, args, out, out, env), limit);
  e.seconds = seconds_since(t0);
  e.out = slurp(out);
  return e;
}

// The torchrun-style variables of rank `rank` of `world`, meeting on `port`.
std::map<std::string, std::string> torchrun_rank(int rank, int world, int port) {
  return {{"RANK", std::to_string(rank)},         {"WORLD_SIZE", std::to_string(world)},
          {"LOCAL_RANK", std::to_string(rank)},   {"MASTER_ADDR", "127.0.0.1"},
          {"MASTER_PORT", std::to_string(port)},  {"BLM_RENDEZVOUS_TIMEOUT", "60"}};
}

}  // namespace

TEST_CASE("program: device.backend cpu under a launcher is refused before the rendezvous",
          "[distributed]") {
  TempDir dir;
  write_tiny_run(dir.path);
  const int port = free_local_port();
  for (int rank = 0; rank < 2; ++rank) {  // each alone: neither may wait for the other
    const Ended e = train_with(dir, {"--set", "device.backend=cpu"}, torchrun_rank(rank, 2, port),
                               30);
    CHECK(e.failed());
    CHECK(e.seconds < 20);
    CHECK(e.out == "barrierlm: error: device.backend is 'cpu' but data-parallel training "
                   "(WORLD_SIZE=2: a torchrun-style launch of 2 ranks) needs the CUDA backend "
                   "and NCCL; use device.backend=cuda or auto\n");
  }
}

TEST_CASE("program: under a launcher device.gpus is 1 or the world size, and named as such",
          "[distributed]") {
  TempDir dir;
  write_tiny_run(dir.path);
  auto lone_rank0 = torchrun_rank(0, 2, free_local_port());
  lone_rank0["BLM_RENDEZVOUS_TIMEOUT"] = "1";
  Ended e = train_with(dir, {"--set", "device.gpus=4"}, lone_rank0);
  CHECK(e.failed());
  CHECK(e.out == "barrierlm: error: device.gpus is 4 but under a torchrun-style launch each rank "
                 "drives one GPU, so the launcher's world size (WORLD_SIZE=2) is the number of "
                 "GPUs; set device.gpus to 1 or 2\n");
  // The world size itself is accepted: this rank goes on to wait for rank 1.
  e = train_with(dir, {"--set", "device.gpus=2"}, lone_rank0);
  CHECK(e.failed());
  CHECK_FALSE(contains(e.out, "device.gpus"));
  CHECK(contains(e.out, "rendezvous"));
  // A run directory's config.yaml records its last GPU count; a resume on another is no error.
  fs::create_directories(dir.path + "/old");
  std::string recorded = slurp(dir.path + "/cfg.yaml");
  const std::string device = "device: {backend: auto, precision: fp32";
  REQUIRE(contains(recorded, device));
  recorded.replace(recorded.find(device), device.size(), device + ", gpus: 4");
  write_file(dir.path + "/old/config.yaml", recorded);
  const std::string out = dir.path + "/out";
  const int st = wait_for(
      spawn_barrierlm(dir.path, {"train", "--resume", "old"}, out, out, lone_rank0), 60);
  CHECK((WIFEXITED(st) && WEXITSTATUS(st) == 1));
  CHECK(contains(slurp(out), "'old/' holds no checkpoint.bin"));  // past the config's checks
  // A batch that does not split over the ranks names the launcher's world, not device.gpus.
  e = train_with(dir, {}, torchrun_rank(0, 3, free_local_port()));
  CHECK(e.failed());
  CHECK(e.out == "barrierlm: error: train.batch_size (4) must be divisible by train.grad_accum x "
                 "the launcher's world size (1 x 3 = 3, WORLD_SIZE=3)\n");
}

TEST_CASE("program: a launch of one task lets --gpus start its own workers", "[distributed]") {
  TempDir dir;
  write_tiny_run(dir.path);
  // No GPU visible in any build: the workers are refused after the launcher's check.
  Ended e = train_with(dir, {"--gpus", "2"},
                       {{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"CUDA_VISIBLE_DEVICES", ""}});
  CHECK(e.failed());
  CHECK(contains(e.out, "barrierlm: note: --gpus 2 starts its own workers; the torchrun-style "
                        "launch's single-task variables (RANK=0, WORLD_SIZE=1) are ignored\n"));
  CHECK(contains(e.out, "barrierlm: error: --gpus 2: only 0 GPU(s) visible"));
  // device.gpus (not --gpus) is named as device.gpus.
  e = train_with(dir, {"--set", "device.gpus=2"},
                 {{"SLURM_PROCID", "0"}, {"SLURM_STEP_NUM_TASKS", "1"}, {"SLURM_LOCALID", "0"},
                  {"CUDA_VISIBLE_DEVICES", ""}});
  CHECK(e.failed());
  CHECK(contains(e.out, "barrierlm: note: device.gpus = 2 starts its own workers; the Slurm "
                        "launch's single-task variables (SLURM_PROCID=0, SLURM_STEP_NUM_TASKS=1) "
                        "are ignored\n"));
  CHECK(contains(e.out, "barrierlm: error: device.gpus = 2: only 0 GPU(s) visible"));
  e = train_with(dir, {"--set", "device.gpus=2"}, {{"CUDA_VISIBLE_DEVICES", ""}});
  CHECK(e.failed());
  CHECK(e.out.rfind("barrierlm: error: device.gpus = 2: only 0 GPU(s) visible", 0) == 0);
}

TEST_CASE("program: two torchrun-style ranks with different configs both name the key",
          "[distributed]") {
  TempDir dir;
  write_tiny_run(dir.path);
  const std::string port = std::to_string(free_local_port());
  auto env = [&](int r) {
    return std::map<std::string, std::string>{{"RANK", std::to_string(r)},
                                              {"WORLD_SIZE", "2"},
                                              {"LOCAL_RANK", std::to_string(r)},
                                              {"MASTER_ADDR", "127.0.0.1"},
                                              {"MASTER_PORT", port},
                                              {"BLM_RENDEZVOUS_TIMEOUT", "30"}};
  };
  const std::string out0 = dir.path + "/out0", out1 = dir.path + "/out1";
  const pid_t p0 = spawn_barrierlm(dir.path, {"train", "cfg.yaml"}, out0, out0, env(0));
  const pid_t p1 =
      spawn_barrierlm(dir.path, {"train", "cfg.yaml", "--set", "train.lr=0.002"}, out1, out1, env(1));
  const int st0 = wait_for(p0, 60), st1 = wait_for(p1, 60);
  const std::string want =
      "barrierlm: error: rank 1's settings differ from rank 0's: train.lr is 0.002 on rank 1 but "
      "0.001 on rank 0 (every rank must run the same config)\n";
  CHECK((WIFEXITED(st0) && WEXITSTATUS(st0) == 1));
  CHECK((WIFEXITED(st1) && WEXITSTATUS(st1) == 1));
  CHECK(slurp(dir.path + "/out0") == want);
  CHECK(slurp(dir.path + "/out1") == want);
  CHECK_FALSE(fs::exists(dir.path + "/runs"));  // nothing written
}
