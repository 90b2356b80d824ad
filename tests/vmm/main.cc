// The kvm suite's main: like gtest_main, but a run in which every test was skipped (no usable
// /dev/kvm here) exits with 77, which ctest reports as Skipped rather than Passed.
#include <gtest/gtest.h>

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  int status = RUN_ALL_TESTS();
  const ::testing::UnitTest& unit = *::testing::UnitTest::GetInstance();
  if (status == 0 && unit.test_to_run_count() > 0 && unit.skipped_test_count() == unit.test_to_run_count()) return 77;
  return status;
}
