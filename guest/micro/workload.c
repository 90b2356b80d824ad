// The deltavm micro guest's workload: deterministic writes over many MiB of guest memory, in
// passes that each touch a different quarter of its pages, reported by port I/O:
//   0x500 checkpoint  (32-bit: number of passes completed)
//   0x504 heartbeat   (after every `heartbeat_bytes` written, so a host always hears soon)
//   0x501/0x502       checksum of the whole work area, low and high 32 bits, after the last pass
//   0x503 done        (32-bit status, 0 = finished; 1 = bad parameters)
// The final checksum depends only on the parameters, so a run that was captured, stored as a
// delta chain and restored elsewhere must end with the same checksum as one never interrupted.
// Runs in ring 3; freestanding: no libc, no SSE.
#include <stdint.h>

struct parameters {  // Written by the VMM at 0x7000 (struct MicroGuestParameters).
  uint64_t magic;
  uint64_t work_address;
  uint64_t work_bytes;
  uint64_t passes;
  uint64_t seed;
  uint64_t heartbeat_bytes;
};

enum {
  kPortCheckpoint = 0x500,
  kPortChecksumLow = 0x501,
  kPortChecksumHigh = 0x502,
  kPortDone = 0x503,
  kPortHeartbeat = 0x504,
  kWordsPerPage = 512,
};

static inline void out32(uint16_t port, uint32_t value) {
  __asm__ volatile("outl %0, %1" : : "a"(value), "d"(port) : "memory");
}

static inline uint64_t xorshift64(uint64_t x) {
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return x;
}

// Whether pass `pass` writes page `page`: about a quarter of the pages, a different quarter
// each pass.
static inline int selected(uint64_t page, uint64_t pass) {
  uint64_t h = (page + 1) * 0x9e3779b97f4a7c15ull ^ (pass + 1) * 0xc2b2ae3d27d4eb4full;
  return ((h >> 29) & 3) == 0;
}

void micro_main(const struct parameters* p) {
  if (p->magic != 0x3152415043494d44ull || p->work_bytes % 4096 != 0 || p->heartbeat_bytes == 0) {
    for (;;) out32(kPortDone, 1);
  }
  volatile uint64_t* words = (volatile uint64_t*)p->work_address;
  uint64_t pages = p->work_bytes / 4096;
  uint64_t state = p->seed | 1;
  uint64_t since_heartbeat = 0;
  for (uint64_t pass = 0; pass < p->passes; ++pass) {
    for (uint64_t page = 0; page < pages; ++page) {
      if (!selected(page, pass)) continue;
      volatile uint64_t* w = words + page * kWordsPerPage;
      for (int i = 0; i < kWordsPerPage; ++i) {
        state = xorshift64(state);
        w[i] = w[i] * 6364136223846793005ull + state;
      }
      since_heartbeat += 4096;
      if (since_heartbeat >= p->heartbeat_bytes) {
        since_heartbeat = 0;
        out32(kPortHeartbeat, (uint32_t)page);
      }
    }
    out32(kPortCheckpoint, (uint32_t)(pass + 1));
  }
  uint64_t checksum = 0;
  for (uint64_t i = 0; i < pages * kWordsPerPage; ++i) checksum = (checksum ^ words[i]) * 0x100000001b3ull;
  out32(kPortChecksumLow, (uint32_t)checksum);
  out32(kPortChecksumHigh, (uint32_t)(checksum >> 32));
  for (;;) out32(kPortDone, 0);
}
