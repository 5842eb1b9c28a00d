// Errors the runners report: one line saying what is wrong and what to do. Only main() prints them.
#pragma once

#include <stdexcept>
#include <string>

namespace torchchat {

// A failure that is not the user's fault in the command line (a broken artifact, a backend error).
class RunnerError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A flag, file or value given by the user is wrong; main() exits with status 2 for these.
class UsageError : public RunnerError {
 public:
  using RunnerError::RunnerError;
};

}  // namespace torchchat
