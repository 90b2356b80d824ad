#include "image/delta.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <thread>

namespace deltavm {
namespace {

// Bytes per page in a run-encoded page beyond which the whole page is stored instead: above
// this the runs' bytes and headers cost about as much as the page itself.
constexpr uint64_t kRunsLimitBytes = kPageSize - 64;

// Appends the runs where `base` and `target` differ, merging stretches whose gap is at most
// `merge_gap` bytes. Returns the bytes the runs would store (values plus about two header
// bytes per run), stopping early once that exceeds kRunsLimitBytes.
uint64_t find_runs(const uint8_t* base, const uint8_t* target, uint32_t merge_gap, std::vector<PageRun>& runs) {
  runs.clear();
  uint64_t cost = 0;
  size_t offset = 0;
  while (offset < kPageSize) {
    // Find the next differing byte: word by word on the 8-byte grid, byte by byte off it.
    size_t start;
    if (offset % 8 == 0) {
      uint64_t a, b;
      std::memcpy(&a, base + offset, 8);
      std::memcpy(&b, target + offset, 8);
      if (a == b) {
        offset += 8;
        continue;
      }
      start = offset + static_cast<size_t>(std::countr_zero(a ^ b) / 8);
    } else {
      if (base[offset] == target[offset]) {
        ++offset;
        continue;
      }
      start = offset;
    }
    // Extend the run until more than merge_gap equal bytes follow it.
    size_t end = start + 1;  // Exclusive.
    size_t probe = end;
    while (probe < kPageSize && probe - end <= merge_gap) {
      if (base[probe] != target[probe]) end = probe + 1;
      ++probe;
    }
    runs.push_back(PageRun{static_cast<uint16_t>(start), static_cast<uint16_t>(end - start)});
    cost += (end - start) + 2;
    if (cost > kRunsLimitBytes) return cost;
    offset = probe;
  }
  return cost;
}

}  // namespace

DeltaStats Delta::stats() const {
  DeltaStats stats;
  for (const PageEdit& edit : edits) {
    switch (edit.encoding) {
      case PageEncoding::kZero: ++stats.zero_pages; break;
      case PageEncoding::kRuns: ++stats.run_pages; break;
      case PageEncoding::kFull: ++stats.full_pages; break;
    }
  }
  stats.runs = runs.size();
  stats.data_bytes = data.size();
  return stats;
}

std::span<const uint8_t> Delta::edit_bytes(const PageEdit& edit) const {
  uint64_t length = 0;
  if (edit.encoding == PageEncoding::kFull) length = kPageSize;
  for (const PageRun& run : edit_runs(edit)) length += run.length;
  return std::span<const uint8_t>(data).subspan(edit.data_offset, length);
}

std::span<const PageRun> Delta::edit_runs(const PageEdit& edit) const {
  return std::span<const PageRun>(runs).subspan(edit.first_run, edit.run_count);
}

void DeltaBuilder::add_zero(uint64_t page_index) {
  delta_.edits.push_back(PageEdit{page_index, PageEncoding::kZero, 0, delta_.runs.size(), delta_.data.size()});
}

void DeltaBuilder::add_full(uint64_t page_index, const uint8_t* page) {
  delta_.edits.push_back(PageEdit{page_index, PageEncoding::kFull, 0, delta_.runs.size(), delta_.data.size()});
  delta_.data.insert(delta_.data.end(), page, page + kPageSize);
}

void DeltaBuilder::add_runs(uint64_t page_index, std::span<const PageRun> runs, const uint8_t* values) {
  delta_.edits.push_back(PageEdit{page_index, PageEncoding::kRuns, static_cast<uint32_t>(runs.size()),
                                  delta_.runs.size(), delta_.data.size()});
  uint64_t total = 0;
  for (const PageRun& run : runs) total += run.length;
  delta_.runs.insert(delta_.runs.end(), runs.begin(), runs.end());
  delta_.data.insert(delta_.data.end(), values, values + total);
}

Result<Delta> diff(std::span<const uint8_t> base, std::span<const uint8_t> target, const DiffOptions& options) {
  if (base.size() != target.size()) {
    return make_error(ErrorCode::kInvalidArgument,
                      "base is {} bytes but target is {} bytes; images must be the same size", base.size(),
                      target.size());
  }
  DELTAVM_TRY(check_image_size(base.size(), "image"));
  const uint64_t pages = page_count(base.size());
  if (options.dirty != nullptr && options.dirty->pages() != pages) {
    return make_error(ErrorCode::kInvalidArgument, "dirty bitmap covers {} pages but the images have {} pages",
                      options.dirty->pages(), pages);
  }

  DeltaBuilder builder(base.size());
  std::vector<PageRun> runs;
  std::vector<uint8_t> values;
  auto diff_page = [&](uint64_t page) {
    const uint8_t* base_page = base.data() + page * kPageSize;
    const uint8_t* target_page = target.data() + page * kPageSize;
    if (std::memcmp(base_page, target_page, kPageSize) == 0) return;
    if (is_zero_page(target_page)) {
      builder.add_zero(page);
      return;
    }
    if (find_runs(base_page, target_page, options.merge_gap_bytes, runs) > kRunsLimitBytes) {
      builder.add_full(page, target_page);
      return;
    }
    values.clear();
    for (const PageRun& run : runs) {
      values.insert(values.end(), target_page + run.offset, target_page + run.offset + run.length);
    }
    builder.add_runs(page, runs, values.data());
  };

  constexpr uint64_t kProgressPages = 16384;
  auto report = [&](uint64_t page) {
    if (options.progress && page % kProgressPages == 0) options.progress(page, pages);
  };
  // Digest both images on a second core while this one compares them. Comparing is
  // memory-bound and cheap, hashing is compute-bound: side by side they take about as long as
  // the hashing alone. With a dirty bitmap only its pages are compared, but the digests still
  // cover every page, so that a bitmap that missed a change is caught when the delta is
  // verified instead of silently storing the wrong image.
  ImageDigest base_digest, target_digest;
  std::thread digester([&] {
    base_digest = digest_image(base);
    target_digest = digest_image(target);
  });
  for (uint64_t page = 0; page < pages; ++page) {
    report(page);
    if (options.dirty == nullptr || options.dirty->test(page)) diff_page(page);
  }
  digester.join();
  Delta delta = builder.finish();
  delta.base_digest = base_digest;
  delta.target_digest = target_digest;
  return delta;
}

void apply_edit(const Delta& delta, const PageEdit& edit, uint8_t* page) {
  const uint8_t* bytes = delta.data.data() + edit.data_offset;
  switch (edit.encoding) {
    case PageEncoding::kZero: std::memset(page, 0, kPageSize); break;
    case PageEncoding::kFull: std::memcpy(page, bytes, kPageSize); break;
    case PageEncoding::kRuns:
      for (const PageRun& run : delta.edit_runs(edit)) {
        std::memcpy(page + run.offset, bytes, run.length);
        bytes += run.length;
      }
      break;
  }
}

namespace {

// Appends to `builder` the composition of two edits of the same page: first, then second.
void compose_edits(const Delta& first, const PageEdit& a, const Delta& second, const PageEdit& b,
                   DeltaBuilder& builder) {
  if (b.encoding != PageEncoding::kRuns) {
    // The second edit replaces the whole page.
    if (b.encoding == PageEncoding::kZero)
      builder.add_zero(b.page_index);
    else
      builder.add_full(b.page_index, second.data.data() + b.data_offset);
    return;
  }
  std::array<uint8_t, kPageSize> page{};
  if (a.encoding != PageEncoding::kRuns) {
    // First fixed the whole page; second patches it: the result is a whole page.
    apply_edit(first, a, page.data());
    apply_edit(second, b, page.data());
    builder.add_full(b.page_index, page.data());
    return;
  }
  // Both are runs over the unknown base page: overlay them and keep the union of the bytes
  // written, second's values winning.
  std::array<bool, kPageSize> written{};
  for (const auto* pair : {&a, &b}) {
    const Delta& delta = pair == &a ? first : second;
    const uint8_t* bytes = delta.data.data() + pair->data_offset;
    for (const PageRun& run : delta.edit_runs(*pair)) {
      std::memcpy(page.data() + run.offset, bytes, run.length);
      std::fill_n(written.begin() + run.offset, run.length, true);
      bytes += run.length;
    }
  }
  std::vector<PageRun> runs;
  std::vector<uint8_t> values;
  for (size_t offset = 0; offset < kPageSize;) {
    if (!written[offset]) {
      ++offset;
      continue;
    }
    size_t end = offset;
    while (end < kPageSize && written[end]) ++end;
    runs.push_back(PageRun{static_cast<uint16_t>(offset), static_cast<uint16_t>(end - offset)});
    values.insert(values.end(), page.begin() + offset, page.begin() + end);
    offset = end;
  }
  builder.add_runs(b.page_index, runs, values.data());
}

void copy_edit(const Delta& delta, const PageEdit& edit, DeltaBuilder& builder) {
  switch (edit.encoding) {
    case PageEncoding::kZero: builder.add_zero(edit.page_index); break;
    case PageEncoding::kFull: builder.add_full(edit.page_index, delta.data.data() + edit.data_offset); break;
    case PageEncoding::kRuns:
      builder.add_runs(edit.page_index, delta.edit_runs(edit), delta.data.data() + edit.data_offset);
      break;
  }
}

}  // namespace

Status apply_delta(const Delta& delta, std::span<uint8_t> memory) {
  if (memory.size() != delta.image_size_bytes) {
    return make_error(ErrorCode::kInvalidArgument, "delta is for a {}-byte image but the memory is {} bytes",
                      delta.image_size_bytes, memory.size());
  }
  for (const PageEdit& edit : delta.edits) {
    apply_edit(delta, edit, memory.data() + edit.page_index * kPageSize);
  }
  return {};
}

Result<Delta> squash(const Delta& first, const Delta& second) {
  if (first.image_size_bytes != second.image_size_bytes) {
    return make_error(ErrorCode::kInvalidArgument,
                      "cannot squash: first delta is for {}-byte images, second for {}-byte images",
                      first.image_size_bytes, second.image_size_bytes);
  }
  if (first.target_digest && second.base_digest && *first.target_digest != *second.base_digest) {
    return make_error(ErrorCode::kInvalidArgument,
                      "cannot squash: first delta produces image {} but second applies to image {}",
                      first.target_digest->hex(), second.base_digest->hex());
  }
  DeltaBuilder builder(first.image_size_bytes);
  auto a = first.edits.begin();
  auto b = second.edits.begin();
  while (a != first.edits.end() || b != second.edits.end()) {
    if (b == second.edits.end() || (a != first.edits.end() && a->page_index < b->page_index)) {
      copy_edit(first, *a++, builder);
    } else if (a == first.edits.end() || b->page_index < a->page_index) {
      copy_edit(second, *b++, builder);
    } else {
      compose_edits(first, *a++, second, *b++, builder);
    }
  }
  Delta result = builder.finish();
  result.base_digest = first.base_digest;
  result.target_digest = second.target_digest;
  return result;
}

}  // namespace deltavm
