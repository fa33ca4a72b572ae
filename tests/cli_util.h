// Helpers of the tests that run the barrierlm program and look at what it wrote: a temporary
// directory, whole-file reads and writes, running the built binary ($BLM_BINARY, set by
// tests/CMakeLists.txt) or a shell command line with its exit status, stdout and stderr captured,
// the lines and numbers of that output, and the learnable text the end-to-end tests train on.
// Header-only: every tests/test_*.cpp is an executable of its own.
#pragma once
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "cmd/json.h"
#include "core/rng.h"
#include "tests/catch.h"

namespace blm {
namespace test {

// ------------------------------------------------------------------ files

// A fresh directory under the system temp dir, removed (with everything in it) afterwards.  Named
// after the test program (blm_test_cli_XXXXXX, ...), so a directory left by a killed run says
// which test made it.
struct TempDir {
  std::string path;
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() /
                        (std::string("blm_") + program_invocation_short_name + "_XXXXXX"))
                           .string();
    REQUIRE(mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& name) const { return path + "/" + name; }
};

// The whole file ("" when it cannot be read).
inline std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// The whole file; fails the test when it cannot be opened.
inline std::string slurp_required(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.good());
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

inline void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  REQUIRE(out.good());
}

// ------------------------------------------------------------------ running the program

inline std::string binary() {
  const char* b = std::getenv("BLM_BINARY");
  REQUIRE(b != nullptr);  // set by tests/CMakeLists.txt
  return b;
}

// A finished program: its exit status (-signal when a signal killed it, so a graceful exit 130 is
// not mistaken for death by SIGINT; -1 from run_shell), stdout and stderr.
struct Run {
  int rc = -1;
  std::string out, err;
};

// Starts barrierlm with args in dir (its working directory), with the extra environment
// variables env, stdout to out_path and stderr to err_path (absolute paths; the same path for
// both puts both in one file); returns the pid.
inline pid_t spawn_barrierlm(const std::string& dir, const std::vector<std::string>& args,
                             const std::string& out_path, const std::string& err_path,
                             const std::map<std::string, std::string>& env = {}) {
  const std::string bin = binary();
  std::fflush(stdout);  // or the child's exit could write the parent's buffered output again
  std::fflush(stderr);
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    if (chdir(dir.c_str()) != 0) _exit(127);
    const int out = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int err = err_path == out_path ? out : open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(out, 1);
    dup2(err, 2);
    for (const auto& [k, v] : env) setenv(k.c_str(), v.c_str(), 1);
    std::vector<char*> argv;
    argv.push_back(const_cast<char*>(bin.c_str()));
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(bin.c_str(), argv.data());
    _exit(127);
  }
  return pid;
}

// Starts barrierlm with args in dir, stdout / stderr to the files dir/.stdout, dir/.stderr.
inline pid_t spawn(const std::string& dir, const std::vector<std::string>& args) {
  return spawn_barrierlm(dir, args, dir + "/.stdout", dir + "/.stderr");
}

// Waits for a program spawn() started and collects what it printed (removing the two files).
inline Run finish(const std::string& dir, pid_t pid) {
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  Run r;
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
  r.out = slurp(dir + "/.stdout");
  r.err = slurp(dir + "/.stderr");
  std::filesystem::remove(dir + "/.stdout");
  std::filesystem::remove(dir + "/.stderr");
  return r;
}

// Runs barrierlm with args in dir and waits for it.
inline Run run(const std::string& dir, const std::vector<std::string>& args) {
  return finish(dir, spawn(dir, args));
}

// Runs a shell command line with stdout / stderr captured in files of dir (removed afterwards).
inline Run run_shell(const std::string& dir, const std::string& command) {
  const std::string out = dir + "/.out", err = dir + "/.err";
  const int status = std::system((command + " >'" + out + "' 2>'" + err + "'").c_str());
  Run r;
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = slurp(out);
  r.err = slurp(err);
  std::filesystem::remove(out);
  std::filesystem::remove(err);
  return r;
}

// ------------------------------------------------------------------ reading the output

// The non-empty lines of text.
inline std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(line);
  return out;
}

// How often `what` occurs in text (overlapping occurrences counted).
inline size_t count_of(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t p = text.find(what); p != std::string::npos; p = text.find(what, p + 1)) ++n;
  return n;
}

// The number of "key" in JSON the program wrote; fails the test when there is none.
inline double number(const std::string& json, const std::string& key) {
  double v = NAN;
  INFO("key " << key << " in " << json.substr(0, 400));
  REQUIRE(json_find_number(json, key, &v));
  return v;
}

// The program exited with status rc and its stderr starts with the line "barrierlm: error: ..."
// containing each of `parts`; with status 1 that line is all of stderr (other statuses, such as
// usage errors' 2, may print more after it).
inline void check_error(const Run& r, int rc, const std::vector<std::string>& parts) {
  INFO("stdout: " << r.out << "\nstderr: " << r.err);
  CHECK(r.rc == rc);
  const std::vector<std::string> ls = lines_of(r.err);
  REQUIRE(!ls.empty());
  CHECK(ls[0].rfind("barrierlm: error: ", 0) == 0);
  if (rc == 1) CHECK(ls.size() == 1);
  for (const std::string& p : parts) CHECK(ls[0].find(p) != std::string::npos);
}

// ------------------------------------------------------------------ fixtures

// Learnable text of at least `bytes` bytes: words of a small vocabulary, a sentence end now and
// then, so a tiny model's loss falls within a few steps.
inline std::string generated_text(uint64_t seed, size_t bytes) {
  static const char* words[] = {"the", "quick", "brown", "fox", "jumps", "over", "a", "lazy",
                                "dog", "and", "cat", "sat", "on", "mat", "with", "hat",
                                "margin", "token", "support", "barrier"};
  Rng rng(seed);
  std::string text;
  while (text.size() < bytes) {
    text += words[rng.below(20)];
    text += rng.below(12) == 0 ? ".\n" : " ";
  }
  return text;
}

}  // namespace test
}  // namespace blm
