// SIGINT / SIGTERM / SIGHUP handlers of signals.h.  The handler does the only async-signal-safe
// thing: store the signal number in a sig_atomic_t.
#include "cmd/signals.h"

#include <csignal>

namespace blm {

namespace {

volatile std::sig_atomic_t g_signal = 0;

void on_signal(int sig) { g_signal = sig; }

void set_handler(int sig, void (*handler)(int), bool reset_after_first) {
  struct sigaction sa {};
  sa.sa_handler = handler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = reset_after_first ? SA_RESETHAND : 0;
  sigaction(sig, &sa, nullptr);
}

}  // namespace

// SIGHUP (the terminal or SSH session went away) stops a run like Ctrl-C, with a save; unless
// it is ignored (nohup), which stays so.
bool hangup_ignored() {
  struct sigaction old {};
  sigaction(SIGHUP, nullptr, &old);
  return old.sa_handler == SIG_IGN;
}

void install_interrupt_handlers() {
  g_signal = 0;
  set_handler(SIGINT, on_signal, true);
  set_handler(SIGTERM, on_signal, true);
  if (!hangup_ignored()) set_handler(SIGHUP, on_signal, true);
}

void remove_interrupt_handlers() {
  set_handler(SIGINT, SIG_DFL, false);
  set_handler(SIGTERM, SIG_DFL, false);
  if (!hangup_ignored()) set_handler(SIGHUP, SIG_DFL, false);
}

int interrupt_signal() { return g_signal; }

}  // namespace blm
