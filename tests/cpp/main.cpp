#include "check.h"

int main() {
  int passed = 0, failed = 0;
  for (auto& t : mhtest::registry()) {
    const int before = mhtest::failures();
    t.fn();
    const bool ok = mhtest::failures() == before;
    std::printf("%s %s\n", ok ? "PASS" : "FAIL", t.name.c_str());
    (ok ? passed : failed)++;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
