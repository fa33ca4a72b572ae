// The launch environment of core/dist_env.h: which launcher started this process, its rank, its
// machine-local rank (its GPU) and where rank 0's rendezvous is.
#include "core/dist_env.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <iterator>
#include <sstream>
#include <vector>

#include "core/error.h"

namespace blm {

namespace {

// One variable as an integer in [lo, hi]; ConfigError naming it otherwise.
long long env_int(const EnvLookup& env, const char* name, long long lo, long long hi) {
  const char* v = env(name);
  if (v == nullptr || *v == '\0')
    throw ConfigError(std::string("environment variable ") + name + " is not set");
  errno = 0;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  if (end == v || *end != '\0' || errno != 0)
    throw ConfigError(std::string("environment variable ") + name + "='" + v +
                      "' is not an integer");
  if (x < lo || x > hi)
    throw ConfigError(std::string("environment variable ") + name + "=" + v + " must be in [" +
                      std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return x;
}

bool has(const EnvLookup& env, const char* name) {
  const char* v = env(name);
  return v != nullptr && *v != '\0';
}

std::string str(const EnvLookup& env, const char* name) {
  const char* v = env(name);
  return v ? std::string(v) : std::string();
}

double env_seconds(const EnvLookup& env, const char* name, double fallback) {
  if (!has(env, name)) return fallback;
  const char* v = env(name);
  char* end = nullptr;
  const double x = std::strtod(v, &end);
  if (end == v || *end != '\0' || !(x > 0) || x > 1e6)
    throw ConfigError(std::string("environment variable ") + name + "='" + v +
                      "' must be a positive number of seconds");
  return x;
}

constexpr long long kMaxRanks = 1 << 20;

// The three numbers every launcher gives: rank, world, local rank (and local world if known).
struct Ids {
  const char *rank, *world, *local_rank, *local_world;
};

// "RANK=3" as the environment spells it.
std::string assignment(const EnvLookup& env, const char* name) {
  return std::string(name) + "=" + str(env, name);
}

void read_local_ids(const EnvLookup& env, const Ids& ids, LaunchEnv& e) {
  if (has(env, ids.local_rank)) {
    e.local_rank = static_cast<int>(env_int(env, ids.local_rank, 0, kMaxRanks));
  } else if (e.world > 1) {
    throw ConfigError(std::string("environment variable ") + ids.local_rank + " is not set (" +
                      ids.rank + "=" + std::to_string(e.rank) + ", " + ids.world + "=" +
                      std::to_string(e.world) + "): set it to this process's GPU index on its " +
                      "machine");
  }
  const bool local_world_given = ids.local_world && has(env, ids.local_world);
  e.local_world = local_world_given
                      ? static_cast<int>(env_int(env, ids.local_world, 1, kMaxRanks))
                      : e.world;
  // One machine's share of the ranks: more would make encode_threads and the GPU choice wrong.
  if (e.local_world > e.world)
    throw ConfigError(std::string("environment variable ") + assignment(env, ids.local_world) +
                      " must not exceed " + ids.world + "=" + std::to_string(e.world));
  if (e.local_rank >= e.local_world)
    throw ConfigError(std::string("environment variable ") + ids.local_rank + "=" +
                      std::to_string(e.local_rank) + " must be below " +
                      (local_world_given ? ids.local_world : ids.world) + "=" +
                      std::to_string(e.local_world));
}

void read_ids(const EnvLookup& env, const Ids& ids, LaunchEnv& e) {
  e.world = static_cast<int>(env_int(env, ids.world, 1, kMaxRanks));
  e.rank = static_cast<int>(env_int(env, ids.rank, 0, kMaxRanks));
  e.rank_variable = ids.rank;
  e.world_variable = ids.world;
  if (e.rank >= e.world)
    throw ConfigError(std::string("environment variable ") + ids.rank + "=" +
                      std::to_string(e.rank) + " must be below " + ids.world + "=" +
                      std::to_string(e.world));
  read_local_ids(env, ids, e);
}

// The launchers' variable sets, in order of precedence: a launcher started inside another comes
// first (torchrun in an srun step; the ranks of mpirun, whose daemons srun started, inherit that
// step's Slurm variables).
struct LauncherVars {
  const char* name;
  Ids ids;
  bool needs_both;  // present only when rank and world both are (not just one of them)
};

const LauncherVars kLaunchers[] = {
    {"torchrun-style", {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}, false},
    {"Open MPI",
     {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
      "OMPI_COMM_WORLD_LOCAL_SIZE"},
     false},
    {"MPICH", {"PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"}, false},
    // Only inside an srun step: an sbatch script also has SLURM_PROCID (and SLURM_NTASKS), but
    // it is a single process.
    {"Slurm", {"SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", nullptr}, true},
};

// Either of rank and world present makes the set present, so that the missing one is named
// rather than the process training alone.
bool present(const EnvLookup& env, const LauncherVars& l) {
  const bool rank = has(env, l.ids.rank), world = has(env, l.ids.world);
  return l.needs_both ? rank && world : rank || world;
}

// A set with more ranks than the winner's cannot be an outer launch of the winner's (every
// outer task starts at least one inner rank): one of them is stale, e.g. a RANK=0 WORLD_SIZE=1
// left in a shell that now runs mpirun, whose ranks would each train alone.
void check_other_launchers(const EnvLookup& env, const LauncherVars& winner, const LaunchEnv& e) {
  for (const LauncherVars& other : kLaunchers) {
    if (&other == &winner || !present(env, other)) continue;
    env_int(env, other.ids.rank, 0, kMaxRanks);  // a malformed set is named, not ignored
    const long long world = env_int(env, other.ids.world, 1, kMaxRanks);
    if (world <= e.world) continue;
    throw ConfigError("conflicting launch variables: " + e.variables() + " (" + winner.name +
                      ", which wins) but " + assignment(env, other.ids.rank) + ", " +
                      assignment(env, other.ids.world) + " (" + other.name +
                      "); a launch inside another has at least as many ranks, so one of these "
                      "sets is left over from elsewhere: unset it");
  }
}

// The rendezvous port under torchrun, whose own store already listens on MASTER_PORT (on rank
// 0's host): the next one.
int port_after_torchrun_store(const LaunchEnv& e, bool port_needed) {
  if (e.master_port < 65535) return e.master_port + 1;
  if (!port_needed) return e.master_port;
  throw ConfigError("MASTER_PORT=65535: under torchrun (TORCHELASTIC_RUN_ID is set) the "
                    "rendezvous uses MASTER_PORT + 1, and 65535 is the last port; give torchrun "
                    "a lower --master-port, or set BLM_RENDEZVOUS_PORT");
}

// MASTER_ADDR / MASTER_PORT when set; `default_host`/`default_port` otherwise (0: none).
void read_master(const EnvLookup& env, LaunchEnv& e, const std::string& default_host,
                 int default_port) {
  e.rendezvous_file = str(env, "BLM_RENDEZVOUS_FILE");
  e.master_addr = has(env, "MASTER_ADDR") ? str(env, "MASTER_ADDR") : default_host;
  if (has(env, "MASTER_PORT"))
    e.master_port = static_cast<int>(env_int(env, "MASTER_PORT", 1, 65535));
  else
    e.master_port = default_port;
  const bool port_needed = e.world > 1 && e.rendezvous_file.empty();
  if (has(env, "BLM_RENDEZVOUS_PORT"))
    e.master_port = static_cast<int>(env_int(env, "BLM_RENDEZVOUS_PORT", 1, 65535));
  else if (has(env, "TORCHELASTIC_RUN_ID") && e.master_port > 0)
    e.master_port = port_after_torchrun_store(e, port_needed);
  if (!port_needed) return;
  if (e.master_addr.empty() || e.master_port == 0)
    throw ConfigError(std::string(e.master_addr.empty() ? "MASTER_ADDR" : "MASTER_PORT") +
                      " is not set: a " + e.launcher + " launch of " + std::to_string(e.world) +
                      " ranks needs rank 0's address (MASTER_ADDR=<rank 0's host> "
                      "MASTER_PORT=<free port>, e.g. mpirun -x MASTER_ADDR -x MASTER_PORT) or a "
                      "shared file BLM_RENDEZVOUS_FILE=<path>");
}

// Slurm's defaults for rank 0's address: the first node of the step, and a port of this job
// step, the same on every rank: 20000 + (job + 131 step) mod 20000.
void read_slurm_master(const EnvLookup& env, LaunchEnv& e) {
  std::string nodes = str(env, "SLURM_STEP_NODELIST");
  if (nodes.empty()) nodes = str(env, "SLURM_JOB_NODELIST");
  if (nodes.empty()) nodes = str(env, "SLURM_NODELIST");
  const std::string host = nodes.empty() ? std::string() : first_slurm_host(nodes);
  const long long job = has(env, "SLURM_JOB_ID") ? env_int(env, "SLURM_JOB_ID", 0, 1LL << 60) : 0;
  const long long step =
      has(env, "SLURM_STEP_ID") ? env_int(env, "SLURM_STEP_ID", 0, 1LL << 40) : 0;
  read_master(env, e, host, static_cast<int>(20000 + (job + 131 * step) % 20000));
}

}  // namespace

EnvLookup process_env() {
  return [](const char* name) -> const char* { return std::getenv(name); };
}

std::string LaunchEnv::describe() const {
  std::ostringstream s;
  s << "rank " << rank << " of " << world << " (local rank " << local_rank << ")";
  if (!launcher.empty()) s << ", " << launcher << " launch";
  if (!rendezvous_file.empty())
    s << ", rendezvous file " << rendezvous_file;
  else if (!master_addr.empty())
    s << ", rendezvous " << master_addr << ":" << master_port;
  return s.str();
}

std::string LaunchEnv::variables() const {
  if (launcher.empty()) return "";
  return rank_variable + "=" + std::to_string(rank) + ", " + world_variable + "=" +
         std::to_string(world);
}

const std::vector<std::string>& rendezvous_variables() {
  static const std::vector<std::string> names = {
      "MASTER_ADDR",         "MASTER_PORT",         "BLM_RENDEZVOUS_FILE",
      "BLM_RENDEZVOUS_PORT", "BLM_RENDEZVOUS_HOST", "TORCHELASTIC_RUN_ID"};
  return names;
}

LaunchEnv detect_launch(const EnvLookup& env) {
  LaunchEnv e;
  e.timeout_s = env_seconds(env, "BLM_NCCL_TIMEOUT", 30);
  e.rendezvous_timeout_s = env_seconds(env, "BLM_RENDEZVOUS_TIMEOUT", 300);
  e.spawned_by_gpus = str(env, "BLM_GPUS_WORKER") == "1";
  const LauncherVars* winner = std::find_if(std::begin(kLaunchers), std::end(kLaunchers),
                                            [&](const LauncherVars& l) { return present(env, l); });
  if (winner == std::end(kLaunchers)) return e;
  const bool torchrun_style = winner == &kLaunchers[0];
  e.launcher = torchrun_style && e.spawned_by_gpus ? "barrierlm --gpus" : winner->name;
  read_ids(env, winner->ids, e);
  check_other_launchers(env, *winner, e);
  if (std::string(winner->name) == "Slurm")  // the step names rank 0's host and a port
    read_slurm_master(env, e);
  else
    read_master(env, e, "", 0);
  return e;
}

std::string first_slurm_host(const std::string& nodelist) {
  auto bad = [&](const std::string& why) {
    return ConfigError("Slurm node list '" + nodelist + "': " + why +
                       "; set MASTER_ADDR to rank 0's host");
  };
  std::string host;
  size_t i = 0;
  while (i < nodelist.size() && nodelist[i] != ',') {
    const char c = nodelist[i];
    if (c == ']') throw bad("unbalanced ']'");
    if (c != '[') {
      host += c;
      ++i;
      continue;
    }
    // A bracket group "[a-b,c,...]": the first host takes a (zero padding kept).
    const size_t close = nodelist.find(']', i);
    if (close == std::string::npos) throw bad("unbalanced '['");
    const std::string group = nodelist.substr(i + 1, close - i - 1);
    size_t n = 0;
    while (n < group.size() && group[n] >= '0' && group[n] <= '9') ++n;
    if (n == 0) throw bad("a bracket group must start with a number");
    host += group.substr(0, n);
    i = close + 1;
  }
  if (host.empty()) throw bad("no host");
  return host;
}

uint64_t fnv1a64(const void* data, size_t bytes, uint64_t h) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

namespace {

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) out.push_back(line);
  return out;
}

// "  lr: 0.001" under "train:" -> key "train.lr", value "0.001"; other lines are their own key.
void split_line(const std::string& line, const std::string& section, std::string& key,
                std::string& value) {
  const size_t colon = line.find(": ");
  const bool indented = !line.empty() && line[0] == ' ';
  if (colon == std::string::npos) {
    key = line;
    value.clear();
    return;
  }
  const size_t start = line.find_first_not_of(' ');
  key = line.substr(start, colon - start);
  if (indented && !section.empty()) key = section + "." + key;
  value = line.substr(colon + 2);
}

}  // namespace

std::string first_difference(const std::string& a, const std::string& a_name,
                             const std::string& b, const std::string& b_name) {
  const std::vector<std::string> la = lines_of(a), lb = lines_of(b);
  std::string section;
  for (size_t i = 0; i < la.size() || i < lb.size(); ++i) {
    const std::string x = i < la.size() ? la[i] : "", y = i < lb.size() ? lb[i] : "";
    if (x == y) {
      if (!x.empty() && x[0] != ' ' && x.back() == ':') section = x.substr(0, x.size() - 1);
      continue;
    }
    if (i >= la.size()) return "'" + y + "' is missing on " + a_name;
    if (i >= lb.size()) return "'" + x + "' is missing on " + b_name;
    std::string kx, vx, ky, vy;
    split_line(x, section, kx, vx);
    split_line(y, section, ky, vy);
    if (kx == ky && !vx.empty())
      return kx + " is " + vx + " on " + a_name + " but " + vy + " on " + b_name;
    return "'" + x + "' on " + a_name + " but '" + y + "' on " + b_name;
  }
  return "";
}

}  // namespace blm
