// A tiny test registry for the torch-free kernel headers (no gtest needed).
// TEST(name) { CHECK(cond); } registers a test; main() runs all and prints
// "N passed, N failed".
#pragma once
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace mhtest {
struct Test { std::string name; std::function<void()> fn; };
inline std::vector<Test>& registry() { static std::vector<Test> r; return r; }
inline int& failures() { static int f = 0; return f; }
struct Register { Register(const char* n, std::function<void()> f) { registry().push_back({n, f}); } };
}  // namespace mhtest

#define TEST(name)                                              \
  static void name();                                           \
  static mhtest::Register name##_reg(#name, name);              \
  static void name()

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::printf("  CHECK failed %s:%d: %s\n", __FILE__, __LINE__, #cond);   \
      ++mhtest::failures();                                                    \
      return;                                                                  \
    }                                                                          \
  } while (0)
