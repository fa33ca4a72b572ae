// The rendezvous, control channel and fatal path of core/dist_control.h, over TCP sockets.
//
// Wire format: every message is a 28-byte header (magic "BLMC", type u32, a u64, b u64, body
// length u32; little-endian) and a body.  Bodies that carry several strings length-prefix each
// (u32).  Messages:
//   HELLO     rank -> 0   a = rank, b = world; body: nonce, host, pid, local rank, settings text
//   WELCOME   0 -> rank   body: the payload (the NCCL unique id)
//   REJECT    0 -> rank   a = 1 for a stale rendezvous file (retry), else 0; body: the message
//   HEARTBEAT both ways   rank -> 0: a = issued collectives; 0 -> rank: body = every rank's count
//   BARRIER   rank -> 0   a = sequence number, b = value; body: what
//   RELEASE   0 -> rank   a = sequence number; body: "" or the difference found
//   FAIL      both ways   body: the message the receiver ends with
//   BYE       both ways   a clean exit follows
#include "core/dist_control.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include "core/checkpoint.h"
#include "core/error.h"

namespace blm {

using Clock = std::chrono::steady_clock;

namespace {

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

Clock::time_point deadline_in(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(
                            std::chrono::duration<double>(seconds));
}

std::string errno_text() { return std::strerror(errno); }

std::string format_seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", s);
  return buf;
}

// ------------------------------------------------------------------ the fatal path

std::mutex g_hooks_mu;
std::map<int, std::function<void()>> g_hooks;
int g_next_hook = 1;
std::atomic<bool> g_fatal{false};
std::string g_fatal_message;  // written once, before the hooks run
std::atomic<int64_t> g_progress{0};

}  // namespace

int add_abort_hook(std::function<void()> hook) {
  std::lock_guard<std::mutex> lock(g_hooks_mu);
  const int id = g_next_hook++;
  g_hooks[id] = std::move(hook);
  return id;
}

void remove_abort_hook(int id) {
  std::lock_guard<std::mutex> lock(g_hooks_mu);
  g_hooks.erase(id);
}

void dist_fatal(const std::string& message) {
  if (g_fatal.exchange(true)) {
    for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));  // the first caller exits
  }
  g_fatal_message = message;
  std::fprintf(stderr, "barrierlm: error: %s; aborting\n", message.c_str());
  std::fflush(stderr);
  // The hooks run on a thread of their own: one that blocks (an NCCL abort that cannot finish)
  // must not keep the process alive.  The lock is held until exit, so an object that removes its
  // hook in a destructor cannot be freed under a running hook.
  std::atomic<bool> done{false};
  std::thread([&done] {
    std::lock_guard<std::mutex> lock(g_hooks_mu);
    for (auto& hook : g_hooks) {  // in registration order: telling the other ranks comes first
      try {
        hook.second();
      } catch (...) {
      }
    }
    done = true;
  }).detach();
  const auto t0 = Clock::now();
  while (!done && seconds_between(t0, Clock::now()) < 10)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  std::fflush(stdout);
  _exit(1);
}

void dist_note_progress(int64_t issued) { g_progress = issued; }

// ------------------------------------------------------------------ sockets and messages

namespace {

constexpr uint32_t kMagic = 0x434d4c42;  // "BLMC" little-endian
constexpr size_t kHeaderBytes = 28;
constexpr uint32_t kMaxBody = 64u << 20;
constexpr double kHeartbeatSeconds = 1.0;
constexpr double kHelloSeconds = 10.0;  // a connected peer sends its HELLO at once

enum MsgType : uint32_t {
  kHello = 1,
  kWelcome,
  kReject,
  kHeartbeat,
  kBarrier,
  kRelease,
  kFail,
  kBye,
};

struct Message {
  uint32_t type = 0;
  uint64_t a = 0, b = 0;
  std::string body;
};

void put_u32(std::string& s, uint32_t v) {
  for (int i = 0; i < 4; ++i) s += static_cast<char>((v >> (8 * i)) & 0xff);
}
void put_u64(std::string& s, uint64_t v) {
  for (int i = 0; i < 8; ++i) s += static_cast<char>((v >> (8 * i)) & 0xff);
}
uint32_t get_u32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}
uint64_t get_u64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}

std::string encode(const Message& m) {
  std::string s;
  put_u32(s, kMagic);
  put_u32(s, m.type);
  put_u64(s, m.a);
  put_u64(s, m.b);
  put_u32(s, static_cast<uint32_t>(m.body.size()));
  return s + m.body;
}

// Takes one complete message off the front of buf; false when it holds none yet.  Throws Error
// for bytes that are not our protocol.
bool take_message(std::string& buf, Message& m) {
  if (buf.size() < kHeaderBytes) return false;
  if (get_u32(buf.data()) != kMagic) throw Error("a connection sent bytes that are not barrierlm's");
  const uint32_t len = get_u32(buf.data() + 24);
  if (len > kMaxBody) throw Error("a connection sent an oversized message");
  if (buf.size() < kHeaderBytes + len) return false;
  m.type = get_u32(buf.data() + 4);
  m.a = get_u64(buf.data() + 8);
  m.b = get_u64(buf.data() + 16);
  m.body = buf.substr(kHeaderBytes, len);
  buf.erase(0, kHeaderBytes + len);
  return true;
}

// Length-prefixed strings inside a body.
void put_str(std::string& s, const std::string& v) {
  put_u32(s, static_cast<uint32_t>(v.size()));
  s += v;
}
std::string get_str(const std::string& body, size_t& pos) {
  if (pos + 4 > body.size()) throw Error("a truncated rendezvous message");
  const uint32_t n = get_u32(body.data() + pos);
  pos += 4;
  if (pos + n > body.size()) throw Error("a truncated rendezvous message");
  std::string v = body.substr(pos, n);
  pos += n;
  return v;
}

struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  ~Fd() { reset(); }
  Fd(Fd&& o) noexcept : fd(o.fd) { o.fd = -1; }
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd = o.fd;
      o.fd = -1;
    }
    return *this;
  }
  void reset() {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }
  int release() {
    const int f = fd;
    fd = -1;
    return f;
  }
};

// Sends all of s before the deadline (MSG_NOSIGNAL: a closed peer is an error, not SIGPIPE).
bool send_all(int fd, const std::string& s, double timeout_s) {
  const auto deadline = deadline_in(timeout_s);
  size_t sent = 0;
  while (sent < s.size()) {
    const ssize_t n = ::send(fd, s.data() + sent, s.size() - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      const double left = seconds_between(Clock::now(), deadline);
      if (left <= 0) return false;
      pollfd p{fd, POLLOUT, 0};
      ::poll(&p, 1, static_cast<int>(std::min(left, 1.0) * 1000) + 1);
      continue;
    }
    return false;
  }
  return true;
}

// Reads one whole message before the deadline; false on timeout or a closed connection (why says
// which).
bool recv_message(int fd, std::string& buf, Message& m, double timeout_s, std::string& why) {
  const auto deadline = deadline_in(timeout_s);
  for (;;) {
    if (take_message(buf, m)) return true;
    const double left = seconds_between(Clock::now(), deadline);
    if (left <= 0) {
      why = "no reply within " + format_seconds(timeout_s) + " s";
      return false;
    }
    pollfd p{fd, POLLIN, 0};
    const int r = ::poll(&p, 1, static_cast<int>(std::min(left, 1.0) * 1000) + 1);
    if (r < 0 && errno != EINTR) {
      why = errno_text();
      return false;
    }
    if (r <= 0) continue;
    char tmp[65536];
    const ssize_t n = ::recv(fd, tmp, sizeof tmp, MSG_DONTWAIT);
    if (n == 0) {
      why = "the connection closed";
      return false;
    }
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      why = errno_text();
      return false;
    }
    buf.append(tmp, static_cast<size_t>(n));
  }
}

void tune_socket(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
}

// A listening socket on every address (IPv6 dual-stack when available) and `port` (0: any).
Fd listen_on(int port, int& bound_port) {
  int one = 1;
  Fd s(::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (s.fd >= 0) {
    int zero = 0;
    ::setsockopt(s.fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    ::setsockopt(s.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in6 a{};
    a.sin6_family = AF_INET6;
    a.sin6_addr = in6addr_any;
    a.sin6_port = htons(static_cast<uint16_t>(port));
    if (::bind(s.fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      const int e = errno;
      if (e != EAFNOSUPPORT && e != EADDRNOTAVAIL) {
        errno = e;
        throw Error("rank 0 cannot listen on port " + std::to_string(port) + ": " + errno_text() +
                    (e == EADDRINUSE ? " (another run? choose another MASTER_PORT or BLM_RENDEZVOUS_PORT)" : ""));
      }
      s.reset();
    }
  }
  if (s.fd < 0) {  // no IPv6 here: IPv4 only
    s = Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (s.fd < 0) throw Error("rank 0 cannot create a socket: " + errno_text());
    ::setsockopt(s.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    a.sin_port = htons(static_cast<uint16_t>(port));
    if (::bind(s.fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
      throw Error("rank 0 cannot listen on port " + std::to_string(port) + ": " + errno_text() +
                  (errno == EADDRINUSE ? " (another run? choose another MASTER_PORT or BLM_RENDEZVOUS_PORT)" : ""));
  }
  if (::listen(s.fd, 1024) != 0) throw Error("rank 0 cannot listen: " + errno_text());
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  ::getsockname(s.fd, reinterpret_cast<sockaddr*>(&ss), &len);
  bound_port = ss.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
                                        : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  ::fcntl(s.fd, F_SETFL, ::fcntl(s.fd, F_GETFL) | O_NONBLOCK);
  return s;
}

// One connection attempt to host:port within timeout_s; an invalid Fd with `why` on failure.
Fd connect_once(const std::string& host, int port, double timeout_s, std::string& why) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const int g = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
  if (g != 0) {
    why = "cannot resolve '" + host + "': " + gai_strerror(g);
    return Fd();
  }
  Fd out;
  for (addrinfo* ai = res; ai != nullptr && out.fd < 0; ai = ai->ai_next) {
    Fd s(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol));
    if (s.fd < 0) continue;
    int r = ::connect(s.fd, ai->ai_addr, ai->ai_addrlen);
    if (r != 0 && errno == EINPROGRESS) {
      pollfd p{s.fd, POLLOUT, 0};
      r = ::poll(&p, 1, static_cast<int>(timeout_s * 1000) + 1);
      if (r <= 0) {
        why = "connection timed out";
        continue;
      }
      int err = 0;
      socklen_t len = sizeof err;
      ::getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) {
        why = std::strerror(err);
        continue;
      }
      r = 0;
    }
    if (r != 0) {
      why = errno_text();
      continue;
    }
    tune_socket(s.fd);
    out = std::move(s);
  }
  ::freeaddrinfo(res);
  return out;
}

std::string host_name() {
  char buf[256] = {0};
  if (::gethostname(buf, sizeof buf - 1) != 0) return "localhost";
  return buf;
}

uint64_t random_nonce() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd() ^
         static_cast<uint64_t>(Clock::now().time_since_epoch().count()) ^
         (static_cast<uint64_t>(::getpid()) << 16);
}

std::string hex64(uint64_t v) {
  char buf[20];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

// The rendezvous file: "barrierlm-rendezvous 1", then "host H", "port P", "nonce N", "world W".
struct FileAddress {
  std::string host, nonce;
  int port = 0, world = 0;
};

bool read_rendezvous_file(const std::string& path, FileAddress& a) {
  std::ifstream in(path);
  if (!in) return false;
  std::string first;
  if (!std::getline(in, first) || first != "barrierlm-rendezvous 1") return false;
  std::string key;
  while (in >> key) {
    if (key == "host") in >> a.host;
    else if (key == "port") in >> a.port;
    else if (key == "nonce") in >> a.nonce;
    else if (key == "world") in >> a.world;
    else return false;
  }
  return !a.host.empty() && a.port > 0 && !a.nonce.empty();
}

}  // namespace

// ------------------------------------------------------------------ the channel

struct Peer {
  Fd fd;
  int rank = -1;
  std::string host;
  std::string inbuf;
  std::timed_mutex send_mu;
  bool bye = false, closed = false;
  Clock::time_point last_seen = Clock::now();
};

struct ControlChannel::Impl {
  LaunchEnv env;
  std::string payload, nonce, file_to_remove;
  std::vector<std::unique_ptr<Peer>> peers;  // rank 0: ranks 1..N-1 in order; others: rank 0
  std::thread thread;
  std::atomic<bool> stop{false};
  std::atomic<bool> failed{false};  // this rank announced a failure: ignore what follows
  int hook_id = 0;

  std::mutex mu;
  std::condition_variable cv;
  uint64_t next_seq = 0;
  struct Arrival {
    uint64_t value;
    std::string what;
  };
  std::map<uint64_t, std::map<int, Arrival>> arrivals;  // rank 0: barrier -> rank -> arrival
  std::map<uint64_t, std::string> releases;             // barrier -> "" or the difference
  std::vector<int64_t> progress;                        // issued collectives per rank

  int rank() const { return env.rank; }
  int world() const { return env.world; }
  bool root() const { return env.rank == 0; }

  bool send(Peer& p, const Message& m, double timeout_s = 5) {
    std::unique_lock<std::timed_mutex> lock(p.send_mu, std::defer_lock);
    if (!lock.try_lock_for(std::chrono::duration<double>(timeout_s))) return false;
    if (p.closed || p.fd.fd < 0) return false;
    return send_all(p.fd.fd, encode(m), timeout_s);
  }

  void broadcast(const Message& m, double timeout_s = 5) {
    for (auto& p : peers) send(*p, m, timeout_s);
  }

  void run();  // the control thread
  void handle(Peer& p, const Message& m);
  void handle_close(Peer& p, const std::string& why);
  void send_heartbeats();
  void check_silence();
  void try_release(uint64_t seq);  // rank 0, mu held
};

namespace {

std::mutex g_channel_mu;
ControlChannel::Impl* g_channel = nullptr;

std::string peer_name(const Peer& p) {
  return "rank " + std::to_string(p.rank) + (p.host.empty() ? "" : " (" + p.host + ")");
}

}  // namespace

void ControlChannel::Impl::run() {
  // Messages that arrived with the rendezvous reply (a failure notice can follow it at once).
  for (auto& p : peers) {
    Message m;
    try {
      while (!stop && take_message(p->inbuf, m)) handle(*p, m);
    } catch (const Error& e) {
      handle_close(*p, e.what());
    }
  }
  auto last_beat = Clock::now() - std::chrono::seconds(10);
  while (!stop) {
    std::vector<pollfd> fds;
    std::vector<Peer*> who;
    for (auto& p : peers)
      if (!p->closed) {
        fds.push_back({p->fd.fd, POLLIN, 0});
        who.push_back(p.get());
      }
    if (fds.empty()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    } else {
      ::poll(fds.data(), fds.size(), 100);
    }
    for (size_t i = 0; i < fds.size() && !stop; ++i) {
      if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      Peer& p = *who[i];
      char tmp[65536];
      const ssize_t n = ::recv(p.fd.fd, tmp, sizeof tmp, MSG_DONTWAIT);
      if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
      if (n <= 0) {
        handle_close(p, n == 0 ? "its connection closed" : "connection error: " + errno_text());
        continue;
      }
      p.inbuf.append(tmp, static_cast<size_t>(n));
      p.last_seen = Clock::now();
      Message m;
      try {
        while (take_message(p.inbuf, m)) handle(p, m);
      } catch (const Error& e) {
        handle_close(p, e.what());
      }
    }
    if (seconds_between(last_beat, Clock::now()) >= kHeartbeatSeconds) {
      send_heartbeats();
      last_beat = Clock::now();
    }
    check_silence();
  }
}

void ControlChannel::Impl::send_heartbeats() {
  Message m;
  m.type = kHeartbeat;
  m.a = static_cast<uint64_t>(g_progress.load());
  if (root()) {
    std::lock_guard<std::mutex> lock(mu);
    progress[0] = g_progress.load();
    for (int64_t v : progress) put_u64(m.body, static_cast<uint64_t>(v));
  }
  for (auto& p : peers)
    if (!p->closed && !p->bye) send(*p, m, 1.0);
}

void ControlChannel::Impl::check_silence() {
  if (failed) return;
  const auto now = Clock::now();
  // At least two missed heartbeats, whatever BLM_NCCL_TIMEOUT says.
  const double limit = std::max(env.timeout_s, 2 * kHeartbeatSeconds);
  for (auto& p : peers) {
    if (p->closed || p->bye) continue;
    const double silent = seconds_between(p->last_seen, now);
    if (silent > limit)
      dist_fatal(peer_name(*p) + " stopped responding (no heartbeat for " +
                 format_seconds(std::floor(silent)) + " s)");
  }
}

void ControlChannel::Impl::handle_close(Peer& p, const std::string& why) {
  const bool clean = p.bye;
  {
    std::unique_lock<std::timed_mutex> lock(p.send_mu);
    p.closed = true;
    p.fd.reset();
  }
  if (clean || failed || stop) return;
  dist_fatal(peer_name(p) + " exited unexpectedly (" + why + ")");
}

void ControlChannel::Impl::handle(Peer& p, const Message& m) {
  switch (m.type) {
    case kHeartbeat: {
      std::lock_guard<std::mutex> lock(mu);
      if (root()) {
        progress[p.rank] = static_cast<int64_t>(m.a);
      } else {
        for (size_t r = 0; r < progress.size() && 8 * r + 8 <= m.body.size(); ++r)
          progress[r] = static_cast<int64_t>(get_u64(m.body.data() + 8 * r));
      }
      break;
    }
    case kBarrier: {
      std::lock_guard<std::mutex> lock(mu);
      arrivals[m.a][p.rank] = Arrival{m.b, m.body};
      try_release(m.a);
      break;
    }
    case kRelease: {
      std::lock_guard<std::mutex> lock(mu);
      releases[m.a] = m.body;
      cv.notify_all();
      break;
    }
    case kFail:
      // Rank 0 names the rank; the others pass rank 0's message on as it is.
      if (!failed)
        dist_fatal(root() ? "rank " + std::to_string(p.rank) + " failed: " + m.body : m.body);
      break;
    case kBye:
      p.bye = true;
      break;
    default:
      throw Error("unexpected message " + std::to_string(m.type) + " from " + peer_name(p));
  }
}

// Rank 0 with mu held: once every rank has reached barrier seq, compare and release them.
void ControlChannel::Impl::try_release(uint64_t seq) {
  auto& got = arrivals[seq];
  if (static_cast<int>(got.size()) < world()) return;
  std::string diff;
  const Arrival& mine = got.at(0);
  for (const auto& [r, a] : got) {
    if (a.what != mine.what) {
      diff = "rank " + std::to_string(r) + " is at '" + a.what + "' but rank 0 at '" + mine.what +
             "'";
      break;
    }
    if (a.value != mine.value) {
      diff = "rank " + std::to_string(r) + " has " + hex64(a.value) + " but rank 0 has " +
             hex64(mine.value) + " at '" + mine.what + "'";
      break;
    }
  }
  Message m;
  m.type = kRelease;
  m.a = seq;
  m.body = diff;
  arrivals.erase(seq);
  releases[seq] = diff;
  for (auto& p : peers) send(*p, m);
  cv.notify_all();
}

std::string dist_describe_stall(int64_t waiting_for, double seconds) {
  const std::string after = "no progress for " + format_seconds(std::floor(seconds)) + " s";
  std::lock_guard<std::mutex> lock(g_channel_mu);
  if (g_channel == nullptr) return "a collective did not complete (" + after + ")";
  std::vector<int64_t> progress;
  {
    std::lock_guard<std::mutex> l2(g_channel->mu);
    progress = g_channel->progress;
  }
  if (!progress.empty()) progress[g_channel->rank()] = g_progress.load();
  int laggard = -1;
  for (size_t r = 0; r < progress.size(); ++r)
    if (progress[r] < waiting_for && (laggard < 0 || progress[r] < progress[laggard]))
      laggard = static_cast<int>(r);
  const std::string me = "rank " + std::to_string(g_channel->rank());
  if (laggard >= 0)
    return "rank " + std::to_string(laggard) + " stopped responding (" + after + ": it issued " +
           std::to_string(progress[laggard]) + " collectives, " + me + " waits on #" +
           std::to_string(waiting_for) + ")";
  return "collective #" + std::to_string(waiting_for) + " did not complete although every rank "
         "issued it (" + after + "; an NCCL, GPU or network hang)";
}

// ------------------------------------------------------------------ joining

namespace {

// Rank 0: accepts the other ranks until all have joined with the same settings.
void accept_ranks(ControlChannel::Impl& c, Fd& listener, int port, const std::string& settings) {
  const int world = c.world();
  const auto deadline = deadline_in(c.env.rendezvous_timeout_s);
  std::vector<std::unique_ptr<Peer>> joined(world);
  int count = 1;
  auto reject_all = [&](const std::string& msg) {
    Message r;
    r.type = kReject;
    r.body = msg;
    for (auto& p : joined)
      if (p) send_all(p->fd.fd, encode(r), 2);
  };
  while (count < world) {
    const double left = seconds_between(Clock::now(), deadline);
    if (left <= 0) {
      std::string missing;
      for (int r = 1; r < world; ++r)
        if (!joined[r]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      const std::string msg = "timed out after " + format_seconds(c.env.rendezvous_timeout_s) +
                              " s waiting for rank(s) " + missing + " to join the rendezvous on "
                              "port " + std::to_string(port) + " (did they start? can they reach "
                              "rank 0? BLM_RENDEZVOUS_TIMEOUT sets the wait)";
      reject_all(msg);
      throw Error(msg);
    }
    pollfd p{listener.fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(std::min(left, 1.0) * 1000) + 1) <= 0) continue;
    Fd s(::accept4(listener.fd, nullptr, nullptr, SOCK_CLOEXEC));
    if (s.fd < 0) continue;
    tune_socket(s.fd);
    std::string buf, why;
    Message hello;
    try {
      if (!recv_message(s.fd, buf, hello, kHelloSeconds, why) || hello.type != kHello) continue;
    } catch (const Error&) {
      continue;  // not one of ours
    }
    size_t pos = 0;
    std::string nonce, host, pid, local, their;
    try {
      nonce = get_str(hello.body, pos);
      host = get_str(hello.body, pos);
      pid = get_str(hello.body, pos);
      local = get_str(hello.body, pos);
      their = get_str(hello.body, pos);
    } catch (const Error&) {
      continue;
    }
    Message reply;
    reply.type = kReject;
    if (nonce != c.nonce) {  // a rank that read a stale rendezvous file: let it read again
      reply.a = 1;
      reply.body = "stale rendezvous file";
      send_all(s.fd, encode(reply), 2);
      continue;
    }
    const int r = static_cast<int>(hello.a);
    std::string fatal;
    const std::string who = "rank " + std::to_string(r) + " (" + host + ", pid " + pid + ")";
    if (static_cast<int>(hello.b) != world)
      fatal = who + " has a world size of " + std::to_string(hello.b) + " but rank 0 has " +
              std::to_string(world) + " (every rank needs the same WORLD_SIZE)";
    else if (r <= 0 || r >= world)
      fatal = who + " has a rank outside [1, " + std::to_string(world) + ")";
    else if (joined[r])
      fatal = "rank " + std::to_string(r) + " joined twice (" + joined[r]->host + " and " + host +
              "): two processes have the same RANK";
    else if (their != settings)
      fatal = "rank " + std::to_string(r) + "'s settings differ from rank 0's: " +
              first_difference(their, "rank " + std::to_string(r), settings, "rank 0") +
              " (every rank must run the same config)";
    if (!fatal.empty()) {
      reply.body = fatal;
      send_all(s.fd, encode(reply), 2);
      reject_all(fatal);
      throw ConfigError(fatal);
    }
    auto peer = std::make_unique<Peer>();
    peer->fd = std::move(s);
    peer->rank = r;
    peer->host = host;
    peer->inbuf = buf;
    joined[r] = std::move(peer);
    ++count;
  }
  for (int r = 1; r < world; ++r) c.peers.push_back(std::move(joined[r]));
}

// Rank 0: publishes the listening address in the rendezvous file (atomically).
void publish_address(ControlChannel::Impl& c, int port) {
  const char* h = std::getenv("BLM_RENDEZVOUS_HOST");
  std::string host = h && *h ? h : (!c.env.master_addr.empty() ? c.env.master_addr : host_name());
  std::ostringstream s;
  s << "barrierlm-rendezvous 1\nhost " << host << "\nport " << port << "\nnonce " << c.nonce
    << "\nworld " << c.world() << "\n";
  write_file_atomic(c.env.rendezvous_file, s.str());
  c.file_to_remove = c.env.rendezvous_file;
}

void join_as_root(ControlChannel::Impl& c, const std::string& settings,
                  const std::function<std::string()>& make_payload) {
  const bool file = !c.env.rendezvous_file.empty();
  c.nonce = file ? hex64(random_nonce()) : "";
  int port = 0;
  Fd listener = listen_on(file ? 0 : c.env.master_port, port);
  if (file) publish_address(c, port);
  try {
    accept_ranks(c, listener, port, settings);
    try {
      c.payload = make_payload();
    } catch (const std::exception& e) {
      Message r;
      r.type = kReject;
      r.body = std::string("rank 0 failed: ") + e.what();
      c.broadcast(r, 2);
      throw;
    }
  } catch (...) {
    if (!c.file_to_remove.empty()) std::remove(c.file_to_remove.c_str());
    throw;
  }
  Message w;
  w.type = kWelcome;
  w.body = c.payload;
  for (auto& p : c.peers)
    if (!c.send(*p, w, 30))
      throw Error("rank 0 could not send the rendezvous reply to " + peer_name(*p));
}

void join_as_worker(ControlChannel::Impl& c, const std::string& settings) {
  const auto deadline = deadline_in(c.env.rendezvous_timeout_s);
  const bool file = !c.env.rendezvous_file.empty();
  std::string last_error = "nothing tried yet", where;
  for (;;) {
    const double left = seconds_between(Clock::now(), deadline);
    if (left <= 0)
      throw Error("rank " + std::to_string(c.rank()) + " could not join the rendezvous at " +
                  (where.empty() ? c.env.rendezvous_file : where) + " within " +
                  format_seconds(c.env.rendezvous_timeout_s) + " s (last: " + last_error +
                  "); is rank 0 running, and are MASTER_ADDR / MASTER_PORT (or "
                  "BLM_RENDEZVOUS_FILE) the same on every rank?");
    std::string host = c.env.master_addr, nonce;
    int port = c.env.master_port;
    if (file) {
      FileAddress a;
      if (!read_rendezvous_file(c.env.rendezvous_file, a)) {
        last_error = "the rendezvous file does not exist yet";
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        continue;
      }
      host = a.host;
      port = a.port;
      nonce = a.nonce;
    }
    where = host + ":" + std::to_string(port);
    Fd s = connect_once(host, port, std::min(left, 5.0), last_error);
    if (s.fd < 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
      continue;
    }
    Message hello;
    hello.type = kHello;
    hello.a = static_cast<uint64_t>(c.rank());
    hello.b = static_cast<uint64_t>(c.world());
    put_str(hello.body, nonce);
    put_str(hello.body, host_name());
    put_str(hello.body, std::to_string(::getpid()));
    put_str(hello.body, std::to_string(c.env.local_rank));
    put_str(hello.body, settings);
    if (!send_all(s.fd, encode(hello), 10)) {
      last_error = "sending to rank 0 failed";
      continue;
    }
    // Rank 0 answers once every rank has joined: wait as long as the rendezvous may take.
    std::string buf;
    Message reply;
    if (!recv_message(s.fd, buf, reply, std::max(1.0, seconds_between(Clock::now(), deadline)),
                      last_error)) {
      last_error = "rank 0 " + last_error;
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
      continue;
    }
    if (reply.type == kReject && reply.a == 1) {  // a stale file: read it again
      last_error = "the rendezvous file was stale";
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      continue;
    }
    if (reply.type == kReject) throw ConfigError(reply.body);
    if (reply.type != kWelcome) throw Error("rank 0 sent an unexpected rendezvous reply");
    c.payload = reply.body;
    auto peer = std::make_unique<Peer>();
    peer->fd = std::move(s);
    peer->rank = 0;
    peer->host = host;
    peer->inbuf = buf;
    c.peers.push_back(std::move(peer));
    return;
  }
}

}  // namespace

std::unique_ptr<ControlChannel> ControlChannel::join(
    const LaunchEnv& env, const std::string& settings,
    const std::function<std::string()>& make_payload) {
  auto impl = std::make_unique<Impl>();
  impl->env = env;
  impl->progress.assign(env.world, 0);
  if (env.rank == 0)
    join_as_root(*impl, settings, make_payload);
  else
    join_as_worker(*impl, settings);
  for (auto& p : impl->peers) p->last_seen = Clock::now();
  Impl* raw = impl.get();
  // The fatal path tells the others first (rank 0: every rank; others: rank 0, which tells all).
  impl->hook_id = add_abort_hook([raw] {
    Message m;
    m.type = kFail;
    m.body = g_fatal_message;
    raw->failed = true;
    raw->broadcast(m, 1);
    if (!raw->file_to_remove.empty()) std::remove(raw->file_to_remove.c_str());
  });
  impl->thread = std::thread([raw] { raw->run(); });
  {
    std::lock_guard<std::mutex> lock(g_channel_mu);
    g_channel = raw;
  }
  return std::unique_ptr<ControlChannel>(new ControlChannel(std::move(impl)));
}

ControlChannel::ControlChannel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

ControlChannel::~ControlChannel() {
  {
    std::lock_guard<std::mutex> lock(g_channel_mu);
    if (g_channel == impl_.get()) g_channel = nullptr;
  }
  remove_abort_hook(impl_->hook_id);
  impl_->stop = true;
  if (impl_->thread.joinable()) impl_->thread.join();
  if (!impl_->failed) {
    Message bye;
    bye.type = kBye;
    impl_->broadcast(bye, 2);
  }
  for (auto& p : impl_->peers) ::shutdown(p->fd.fd, SHUT_WR);
  if (!impl_->file_to_remove.empty()) std::remove(impl_->file_to_remove.c_str());
}

const std::string& ControlChannel::payload() const { return impl_->payload; }
int ControlChannel::rank() const { return impl_->rank(); }
int ControlChannel::world_size() const { return impl_->world(); }

std::string ControlChannel::barrier(const std::string& what, uint64_t value, double timeout_s) {
  Impl& c = *impl_;
  std::unique_lock<std::mutex> lock(c.mu);
  const uint64_t seq = c.next_seq++;
  if (c.root()) {
    c.arrivals[seq][0] = Impl::Arrival{value, what};
    c.try_release(seq);
  } else {
    Message m;
    m.type = kBarrier;
    m.a = seq;
    m.b = value;
    m.body = what;
    lock.unlock();
    c.send(*c.peers[0], m, 30);
    lock.lock();
  }
  if (!c.cv.wait_for(lock, std::chrono::duration<double>(timeout_s),
                     [&] { return c.releases.count(seq) > 0; }))
    throw Error("rank " + std::to_string(c.rank()) + " waited " + format_seconds(timeout_s) +
                " s at '" + what + "' for the other ranks");
  std::string diff = c.releases[seq];
  c.releases.erase(seq);
  return diff;
}

void ControlChannel::announce_failure(const std::string& message) {
  Impl& c = *impl_;
  if (c.failed.exchange(true)) return;
  Message m;
  m.type = kFail;
  m.body = c.root() ? "rank 0 failed: " + message : message;
  c.broadcast(m, 2);
}

}  // namespace blm
