// The `--gpus N` supervisor of cmd/launcher.h: fork/exec of the workers, signal forwarding, and
// the end of the run when one of them dies.
#include "cmd/launcher.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <thread>

#include "core/dist_env.h"
#include "core/error.h"

extern char** environ;

namespace blm {

namespace {

using Clock = std::chrono::steady_clock;

volatile std::sig_atomic_t g_sigint = 0, g_sigterm = 0;

void on_signal(int sig) {
  if (sig == SIGINT) g_sigint = g_sigint + 1;
  if (sig == SIGTERM) g_sigterm = g_sigterm + 1;
}

struct SavedHandlers {
  struct sigaction int_old {}, term_old {};
  SavedHandlers() {
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    sigaction(SIGINT, &sa, &int_old);
    sigaction(SIGTERM, &sa, &term_old);
  }
  ~SavedHandlers() {
    sigaction(SIGINT, &int_old, nullptr);
    sigaction(SIGTERM, &term_old, nullptr);
  }
};

// The environment of worker `rank`: this process's, with the launch variables replaced.
std::vector<std::string> worker_environment(int rank, int workers, int port) {
  const std::vector<std::pair<std::string, std::string>> set = {
      {"RANK", std::to_string(rank)},
      {"WORLD_SIZE", std::to_string(workers)},
      {"LOCAL_RANK", std::to_string(rank)},
      {"LOCAL_WORLD_SIZE", std::to_string(workers)},
      {"MASTER_ADDR", "127.0.0.1"},
      {"MASTER_PORT", std::to_string(port)},
      {"BLM_GPUS_WORKER", "1"},
  };
  // The parent's rendezvous variables (a file, a port, torchrun's port shift) would send the
  // workers elsewhere than the free loopback port chosen for them: none is passed on.
  const std::vector<std::string>& dropped = rendezvous_variables();
  std::vector<std::string> env;
  bool have_nvls = false;
  for (char** e = environ; e && *e; ++e) {
    const std::string kv = *e;
    const std::string key = kv.substr(0, kv.find('='));
    bool replaced = std::find(dropped.begin(), dropped.end(), key) != dropped.end();
    for (const auto& s : set) replaced = replaced || s.first == key;
    if (replaced) continue;
    have_nvls = have_nvls || key == "NCCL_NVLS_ENABLE";
    env.push_back(kv);
  }
  for (const auto& s : set) env.push_back(s.first + "=" + s.second);
  if (!have_nvls) env.push_back("NCCL_NVLS_ENABLE=0");
  return env;
}

std::vector<char*> c_strings(std::vector<std::string>& v) {
  std::vector<char*> out;
  for (std::string& s : v) out.push_back(&s[0]);
  out.push_back(nullptr);
  return out;
}

struct Worker {
  pid_t pid = -1;
  int rank = 0;
  bool running = false;
  int status = 0;
};

// Forks worker `rank`; its argv and envp are built before the fork (nothing is allocated in the
// child between fork and exec).
pid_t start_worker(const LocalLaunch& l, const std::vector<std::string>& args, int rank, int port) {
  std::vector<std::string> argv_s;
  argv_s.push_back(l.program);
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<std::string> env_s = worker_environment(rank, l.workers, port);
  std::vector<char*> argv = c_strings(argv_s), envp = c_strings(env_s);
  const pid_t parent = ::getpid();
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = ::fork();
  if (pid < 0) throw Error("cannot start worker " + std::to_string(rank) + ": " + std::strerror(errno));
  if (pid == 0) {
    ::setpgid(0, 0);  // a terminal's Ctrl-C reaches the workers once, through the parent
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) _exit(1);  // the parent died before prctl
    struct sigaction sa {};
    sa.sa_handler = SIG_DFL;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
    ::execve(argv[0], argv.data(), envp.data());
    const char msg[] = "barrierlm: error: cannot start a worker (exec failed)\n";
    ssize_t ignored = ::write(2, msg, sizeof msg - 1);
    (void)ignored;
    _exit(127);
  }
  return pid;
}

void forward(std::vector<Worker>& workers, int sig) {
  for (const Worker& w : workers)
    if (w.running) ::kill(w.pid, sig);
}

}  // namespace

std::string describe_exit(int st) {
  if (WIFEXITED(st)) return "exited with status " + std::to_string(WEXITSTATUS(st));
  if (WIFSIGNALED(st))
    return "was killed by signal " + std::to_string(WTERMSIG(st)) + " (" +
           std::string(strsignal(WTERMSIG(st))) + ")";
  return "stopped (wait status " + std::to_string(st) + ")";
}

std::vector<std::string> own_arguments() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> args;
  size_t start = 0;
  while (start < all.size()) {
    size_t end = all.find('\0', start);
    if (end == std::string::npos) end = all.size();
    args.push_back(all.substr(start, end - start));
    start = end + 1;
  }
  if (!args.empty()) args.erase(args.begin());  // argv[0]
  return args;
}

int free_local_port() {
  const int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s < 0) throw Error(std::string("cannot create a socket: ") + std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    const std::string why = std::strerror(errno);
    ::close(s);
    throw Error("cannot find a free port on 127.0.0.1: " + why);
  }
  ::close(s);
  return ntohs(a.sin_port);
}

int launch_local_workers(const LocalLaunch& l) {
  const std::vector<std::string> args = l.args.empty() ? own_arguments() : l.args;
  const int port = free_local_port();
  g_sigint = g_sigterm = 0;
  SavedHandlers handlers;
  std::vector<Worker> workers(l.workers);
  for (int r = 0; r < l.workers; ++r) {
    try {
      workers[r].pid = start_worker(l, args, r, port);
    } catch (...) {
      forward(workers, SIGKILL);
      throw;
    }
    workers[r].rank = r;
    workers[r].running = true;
  }
  int forwarded_int = 0, forwarded_term = 0, running = l.workers;
  bool failed = false, interrupted = false, killed_rest = false;
  Clock::time_point kill_at{};
  while (running > 0) {
    for (; forwarded_int < g_sigint; ++forwarded_int) forward(workers, SIGINT);
    for (; forwarded_term < g_sigterm; ++forwarded_term) forward(workers, SIGTERM);
    interrupted = interrupted || forwarded_int > 0 || forwarded_term > 0;
    int st = 0;
    const pid_t pid = ::waitpid(-1, &st, WNOHANG);
    if (pid > 0) {
      for (Worker& w : workers) {
        if (w.pid != pid || !w.running) continue;
        w.running = false;
        w.status = st;
        --running;
        const bool ok = WIFEXITED(st) && (WEXITSTATUS(st) == 0 || WEXITSTATUS(st) == 130);
        // A second Ctrl-C kills the workers by design: that is an interruption, not a failure.
        const bool by_our_signal = WIFSIGNALED(st) && interrupted &&
                                   (WTERMSIG(st) == SIGINT || WTERMSIG(st) == SIGTERM);
        if (!ok && !by_our_signal && !failed) {
          failed = true;
          std::fprintf(stderr, "barrierlm: error: rank %d (pid %d) %s; stopping the other ranks\n",
                       w.rank, static_cast<int>(w.pid), describe_exit(st).c_str());
          std::fflush(stderr);
          kill_at = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                       std::chrono::duration<double>(l.grace_s));
        }
      }
      continue;
    }
    if (failed && !killed_rest && Clock::now() >= kill_at) {
      forward(workers, SIGKILL);  // they had their chance to exit with their own message
      killed_rest = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (failed) return 1;
  bool any_130 = false;
  for (const Worker& w : workers)
    any_130 = any_130 || (WIFEXITED(w.status) && WEXITSTATUS(w.status) == 130) ||
              WIFSIGNALED(w.status);
  return any_130 ? 130 : 0;
}

}  // namespace blm
