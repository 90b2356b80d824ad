// Images for tests: synthetic ones from a seeded generator, shaped like guest RAM (mostly zero
// pages, some random, mutations as runs, zeroed pages and replaced pages), and real guest RAM
// captured by scripts/capture-guest-ram.sh when the suite's fixture has made them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <random>
#include <vector>

namespace deltavm::testing {

std::vector<uint8_t> random_image(uint64_t pages, std::mt19937_64& random);

// A copy of `image` with a random mix of changes: byte runs inside pages, zeroed pages,
// replaced pages. `change_fraction` is roughly the fraction of pages touched.
std::vector<uint8_t> mutate_image(const std::vector<uint8_t>& image, double change_fraction,
                                  std::mt19937_64& random);

// The directory holding the real captured images guest-0.ram, guest-1.ram, guest-2.ram, or
// nothing when the fixture has not produced them (DELTAVM_TEST_IMAGES unset or empty).
std::optional<std::filesystem::path> real_image_directory();

}  // namespace deltavm::testing
