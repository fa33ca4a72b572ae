// Graceful interruption of training: the first SIGINT / SIGTERM / SIGHUP (unless nohup ignores
// it) only sets a flag (the trainer finishes its step, saves a checkpoint and exits 130); the
// handler then resets itself, so a second Ctrl-C stops the program at once.
#pragma once

namespace blm {

void install_interrupt_handlers();
void remove_interrupt_handlers();  // back to the default actions
// The signal that asked us to stop, or 0.
int interrupt_signal();
inline bool interrupted() { return interrupt_signal() != 0; }

}  // namespace blm
