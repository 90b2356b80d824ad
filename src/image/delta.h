// A delta: the changes that turn one guest RAM image (the base) into another (the target),
// page by page at the same guest-physical address. Each changed page is recorded in the
// smallest of three encodings: a zero page, byte runs inside the page, or the whole page.
// Unchanged pages cost nothing. docs/formats.md describes the file form (delta_file.h).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "base/error.h"
#include "image/page.h"

namespace deltavm {

enum class PageEncoding : uint8_t {
  kZero = 1,  // The page becomes all zeros.
  kRuns = 2,  // Byte runs (offset, values) overwrite parts of the base page.
  kFull = 3,  // The whole page is replaced.
};

// A run of bytes inside one page. REQUIRES: length >= 1 and offset + length <= kPageSize.
struct PageRun {
  uint16_t offset;
  uint16_t length;
};

// One changed page. Its bytes (the whole page, or the runs' values in order) start at
// `data_offset` in Delta::data; its runs are Delta::runs[first_run, first_run + run_count).
struct PageEdit {
  uint64_t page_index;
  PageEncoding encoding;
  uint32_t run_count;
  uint64_t first_run;
  uint64_t data_offset;
};

struct DeltaStats {
  uint64_t zero_pages = 0;
  uint64_t run_pages = 0;
  uint64_t full_pages = 0;
  uint64_t runs = 0;
  uint64_t data_bytes = 0;  // Page and run bytes, before compression.
};

// INVARIANT (kept by DeltaBuilder and checked by the file decoder): edits are sorted by strictly
// increasing page_index below page_count(image_size_bytes), runs of a page are in increasing
// offset order without overlap, and every edit's bytes lie inside `data`.
struct Delta {
  uint64_t image_size_bytes = 0;
  // Digests of the whole base and target images (also for a delta made from a dirty bitmap:
  // the digests are how a bitmap that missed a change is caught). Absent in deltas whose
  // producer did not record them.
  std::optional<ImageDigest> base_digest;
  std::optional<ImageDigest> target_digest;
  std::vector<PageEdit> edits;
  std::vector<PageRun> runs;
  std::vector<uint8_t> data;

  DeltaStats stats() const;
  std::span<const uint8_t> edit_bytes(const PageEdit& edit) const;
  std::span<const PageRun> edit_runs(const PageEdit& edit) const;
};

// Appends edits in increasing page order. Used by diff, squash and the file decoder.
class DeltaBuilder {
 public:
  explicit DeltaBuilder(uint64_t image_size_bytes) { delta_.image_size_bytes = image_size_bytes; }
  void add_zero(uint64_t page_index);
  void add_full(uint64_t page_index, const uint8_t* page);
  // `values` holds the runs' bytes back to back.
  void add_runs(uint64_t page_index, std::span<const PageRun> runs, const uint8_t* values);
  Delta& delta() { return delta_; }
  Delta finish() { return std::move(delta_); }

 private:
  Delta delta_;
};

// The run merge gap for a base image (the delta from zeros): its runs then hold whole
// stretches of what a compression reference or other pages repeat, which matches far better
// (measured on a guest base: 8.8 MiB with 2-byte gaps against a reference, 4.1 MiB with 16).
inline constexpr uint32_t kBaseImageMergeGapBytes = 16;

struct DiffOptions {
  // When set, only pages whose bit is set are compared; the others are taken as unchanged.
  const DirtyBitmap* dirty = nullptr;
  // Two differing stretches of a page separated by at most this many equal bytes are stored as
  // one run: a run header costs about two bytes.
  uint32_t merge_gap_bytes = 2;
  // Called now and then with the pages compared so far, for progress displays.
  std::function<void(uint64_t pages_done, uint64_t pages_total)> progress;
};

// The delta from `base` to `target`. Both must be the same whole number of pages.
Result<Delta> diff(std::span<const uint8_t> base, std::span<const uint8_t> target, const DiffOptions& options = {});

// Applies `delta` to `memory` in place. REQUIRES: memory holds the delta's base image (checked
// only for size here: checking the digest would read all of memory; callers that want it
// compare digest_image(memory) with delta.base_digest).
Status apply_delta(const Delta& delta, std::span<uint8_t> memory);

// Applies one edit of `delta` to `page`, which holds the base image's page. REQUIRES: `edit`
// is one of delta.edits.
void apply_edit(const Delta& delta, const PageEdit& edit, uint8_t* page);

// The delta equal to applying `first` and then `second`. Refused if the images differ in size
// or if both record digests and first's target is not second's base.
Result<Delta> squash(const Delta& first, const Delta& second);

}  // namespace deltavm
