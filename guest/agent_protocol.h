/* The command agent's wire protocol, shared by the guest agent (guest/agent.c, C) and the host
 * (src/backends/agent_client.cc, C++). docs/templates.md describes it for people.
 *
 * Every message is a frame: a 28-byte header, then `length` payload bytes. All integers are
 * little-endian.
 *
 *   offset size field
 *        0    4 magic          "DVA2"
 *        4    1 kind           one of the kinds below
 *        5    3 zero
 *        8    8 id             the command the frame belongs to (0: none)
 *       16    4 length         payload bytes that follow the header
 *       20    4 payload_check  FNV-1a 32 of the payload
 *       24    4 header_check   FNV-1a 32 of bytes 0..23
 *
 * A reader looks for the magic, checks the header, and only then trusts the length: a frame's
 * payload is never parsed as frames, and bytes that are not a frame are skipped (so a reader
 * resynchronises after garbage). A frame longer than the receiver's limit is read past whole
 * and refused.
 *
 * Host to guest:
 *   X exec     u32 timeout_ms (0: none), u32 flags (bit 0: stdin follows as I frames; else
 *              stdin is /dev/null), then the command, run as /bin/sh -c COMMAND in a session
 *              of its own. At most AGENT_MAX_COMMAND_BYTES.
 *   I stdin    bytes for the command's stdin; an empty I frame closes it.
 *   K cancel   kill the command's whole process group.
 *   N identity u64 the host's wall clock (CLOCK_REALTIME, nanoseconds since the epoch), then
 *              AGENT_IDENTITY_ENTROPY_BYTES random bytes. Sent on every load of a VM (a clone,
 *              a fork, a resumed VM): the guest sets its clock, adds the bytes to the kernel's
 *              entropy pool and reseeds its random number generator at once, so that clones of
 *              one snapshot neither share random numbers nor run on the snapshot's clock.
 *              Answered, under the frame's id, by S (exit code 0) or F.
 * Guest to host:
 *   R ready    sent once when the agent starts; payload "deltavm-agent 3" (2: before N).
 *   O, E       a chunk of the command's stdout / stderr (at most AGENT_MAX_CHUNK_BYTES).
 *   S status   i32 exit code (-1 if a signal ended it), u32 signal (0 if none), u32 flags
 *              (AGENT_STATUS_*). The last frame of a command.
 *   F failure  the command was not run (or could not go on): a message. The last frame too.
 *
 * Commands run concurrently; each ends in exactly one S or F. A command ends when its process
 * exits: whatever it wrote is sent, and background processes it left are not waited for.
 * The agent kills the process group when the timeout passes (flag TIMED_OUT) or on K
 * (CANCELLED), and stops sending a stream after AGENT_MAX_OUTPUT_BYTES (flag *_TRUNCATED).
 */
#ifndef DELTAVM_GUEST_AGENT_PROTOCOL_H_
#define DELTAVM_GUEST_AGENT_PROTOCOL_H_

#include <stddef.h>
#include <stdint.h>

#define AGENT_MAGIC "DVA2"
#define AGENT_HEADER_BYTES 28
#define AGENT_READY_TEXT "deltavm-agent 3"
/* The protocol version: 3 added N. A template records the version of the agent it holds. */
#define AGENT_PROTOCOL_VERSION 3
#define AGENT_IDENTITY_ENTROPY_BYTES 32

/* MAX_ARG_STRLEN: the longest single argument execve takes (sh -c COMMAND). Longer scripts
 * go through stdin (sh -s). */
#define AGENT_MAX_COMMAND_BYTES (131072 - 1)
#define AGENT_EXEC_PREFIX_BYTES 8
#define AGENT_MAX_CHUNK_BYTES 65536
/* The longest frame either side accepts: an exec request. */
#define AGENT_MAX_FRAME_BYTES (AGENT_EXEC_PREFIX_BYTES + AGENT_MAX_COMMAND_BYTES)
#define AGENT_MAX_OUTPUT_BYTES (16u << 20)
#define AGENT_MAX_COMMANDS 64

#define AGENT_FLAG_STDIN 1u

#define AGENT_STATUS_TIMED_OUT 1u
#define AGENT_STATUS_CANCELLED 2u
#define AGENT_STATUS_STDOUT_TRUNCATED 4u
#define AGENT_STATUS_STDERR_TRUNCATED 8u

static inline uint32_t agent_fnv1a(uint32_t hash, const void* bytes, size_t length) {
  const unsigned char* p = (const unsigned char*)bytes;
  for (size_t i = 0; i < length; ++i) {
    hash ^= p[i];
    hash *= 16777619u;
  }
  return hash;
}

#define AGENT_FNV_START 2166136261u

static inline void agent_put_u32(unsigned char* out, uint32_t value) {
  for (int i = 0; i < 4; ++i) out[i] = (unsigned char)(value >> (8 * i));
}

static inline void agent_put_u64(unsigned char* out, uint64_t value) {
  for (int i = 0; i < 8; ++i) out[i] = (unsigned char)(value >> (8 * i));
}

static inline uint32_t agent_get_u32(const unsigned char* in) {
  uint32_t value = 0;
  for (int i = 3; i >= 0; --i) value = (value << 8) | in[i];
  return value;
}

static inline uint64_t agent_get_u64(const unsigned char* in) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | in[i];
  return value;
}

/* Fills a frame header for `length` payload bytes. */
static inline void agent_make_header(unsigned char header[AGENT_HEADER_BYTES], char kind, uint64_t id,
                                     const void* payload, uint32_t length) {
  header[0] = 'D';
  header[1] = 'V';
  header[2] = 'A';
  header[3] = '2';
  header[4] = (unsigned char)kind;
  header[5] = header[6] = header[7] = 0;
  agent_put_u64(header + 8, id);
  agent_put_u32(header + 16, length);
  agent_put_u32(header + 20, agent_fnv1a(AGENT_FNV_START, payload, length));
  agent_put_u32(header + 24, agent_fnv1a(AGENT_FNV_START, header, 24));
}

/* Checks a header: 1 if the magic and its check are right, else 0. */
static inline int agent_header_valid(const unsigned char header[AGENT_HEADER_BYTES]) {
  return header[0] == 'D' && header[1] == 'V' && header[2] == 'A' && header[3] == '2' &&
         agent_get_u32(header + 24) == agent_fnv1a(AGENT_FNV_START, header, 24);
}

#endif /* DELTAVM_GUEST_AGENT_PROTOCOL_H_ */
