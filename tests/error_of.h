// error_of<E>(f): the message of the E that f throws, for tests of error messages.  Every message
// a user can see must be one line, so that is checked too.  Header-only: every tests/test_*.cpp
// is an executable of its own.
#pragma once
#include <exception>
#include <string>

#include "tests/catch.h"

namespace blm {
namespace test {

// Fails the test when f throws nothing, or an exception other than an E.
template <class E, class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    const std::string msg = e.what();
    INFO("message: " << msg);
    CHECK(msg.find('\n') == std::string::npos);
    return msg;
  } catch (const std::exception& e) {
    FAIL("expected another exception, got: " << e.what());
  }
  FAIL("no exception was thrown");
  return "";
}

}  // namespace test
}  // namespace blm
