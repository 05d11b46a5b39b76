// tests/support/temp_directory.hpp -- a fixture whose every test gets an empty directory of its
// own under the system's temporary directory, removed when the test ends.
//
// The name carries the process id and the test's name, so parallel ctest runs never share one.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <system_error>

namespace tpattn::test {

class TempDirectoryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
    directory_ = std::filesystem::temp_directory_path() /
                 ("tpattn_" + std::string(info->test_suite_name()) + "_" +
                  std::to_string(::getpid()) + "_" + info->name());
    std::filesystem::remove_all(directory_);
    std::filesystem::create_directories(directory_);
  }
  void TearDown() override {
    std::error_code ignored;
    std::filesystem::remove_all(directory_, ignored);
  }

  std::filesystem::path directory_;
};

}  // namespace tpattn::test
