#include "store/sqlite_vfs.h"

#include <sqlite3.h>

#include <cerrno>
#include <mutex>

#include "base/faults.h"

namespace deltavm {
namespace {

sqlite3_vfs* real_vfs = nullptr;

// A file of this VFS: the header SQLite sees, then the real file (real_vfs->szOsFile bytes).
struct CheckedFile {
  sqlite3_file base;
  sqlite3_file* real() { return reinterpret_cast<sqlite3_file*>(this + 1); }
};

CheckedFile* checked(sqlite3_file* file) { return reinterpret_cast<CheckedFile*>(file); }
sqlite3_file* real(sqlite3_file* file) { return checked(file)->real(); }

int fault_code(int error, int io_code) { return error == ENOSPC ? SQLITE_FULL : io_code; }

int file_close(sqlite3_file* file) { return real(file)->pMethods->xClose(real(file)); }
int file_read(sqlite3_file* file, void* buffer, int amount, sqlite3_int64 offset) {
  return real(file)->pMethods->xRead(real(file), buffer, amount, offset);
}
int file_write(sqlite3_file* file, const void* buffer, int amount, sqlite3_int64 offset) {
  if (int error = injected_fault(DurableCall::kWrite)) return fault_code(error, SQLITE_IOERR_WRITE);
  return real(file)->pMethods->xWrite(real(file), buffer, amount, offset);
}
int file_truncate(sqlite3_file* file, sqlite3_int64 size) {
  if (int error = injected_fault(DurableCall::kTruncate)) return fault_code(error, SQLITE_IOERR_TRUNCATE);
  return real(file)->pMethods->xTruncate(real(file), size);
}
int file_sync(sqlite3_file* file, int flags) {
  if (int error = injected_fault(DurableCall::kFsync)) return fault_code(error, SQLITE_IOERR_FSYNC);
  return real(file)->pMethods->xSync(real(file), flags);
}
int file_size(sqlite3_file* file, sqlite3_int64* size) { return real(file)->pMethods->xFileSize(real(file), size); }
int file_lock(sqlite3_file* file, int level) { return real(file)->pMethods->xLock(real(file), level); }
int file_unlock(sqlite3_file* file, int level) { return real(file)->pMethods->xUnlock(real(file), level); }
int file_check_reserved_lock(sqlite3_file* file, int* out) {
  return real(file)->pMethods->xCheckReservedLock(real(file), out);
}
int file_control(sqlite3_file* file, int op, void* argument) {
  return real(file)->pMethods->xFileControl(real(file), op, argument);
}
int file_sector_size(sqlite3_file* file) { return real(file)->pMethods->xSectorSize(real(file)); }
int file_device_characteristics(sqlite3_file* file) { return real(file)->pMethods->xDeviceCharacteristics(real(file)); }
int file_shm_map(sqlite3_file* file, int region, int size, int extend, void volatile** out) {
  return real(file)->pMethods->xShmMap(real(file), region, size, extend, out);
}
int file_shm_lock(sqlite3_file* file, int offset, int n, int flags) {
  return real(file)->pMethods->xShmLock(real(file), offset, n, flags);
}
void file_shm_barrier(sqlite3_file* file) { real(file)->pMethods->xShmBarrier(real(file)); }
int file_shm_unmap(sqlite3_file* file, int delete_flag) {
  return real(file)->pMethods->xShmUnmap(real(file), delete_flag);
}
// No memory-mapped I/O through this VFS (iVersion 2): every write goes through xWrite.

const sqlite3_io_methods kMethods = {
    2,
    file_close,
    file_read,
    file_write,
    file_truncate,
    file_sync,
    file_size,
    file_lock,
    file_unlock,
    file_check_reserved_lock,
    file_control,
    file_sector_size,
    file_device_characteristics,
    file_shm_map,
    file_shm_lock,
    file_shm_barrier,
    file_shm_unmap,
    nullptr,
    nullptr,
};

int vfs_open(sqlite3_vfs*, const char* name, sqlite3_file* file, int flags, int* out_flags) {
  CheckedFile* wrapper = checked(file);
  wrapper->base.pMethods = nullptr;
  int rc = real_vfs->xOpen(real_vfs, name, wrapper->real(), flags, out_flags);
  // SQLite calls xClose only on a file whose pMethods is set.
  if (wrapper->real()->pMethods != nullptr) wrapper->base.pMethods = &kMethods;
  return rc;
}
int vfs_delete(sqlite3_vfs*, const char* name, int sync_directory) {
  if (int error = injected_fault(DurableCall::kUnlink)) return fault_code(error, SQLITE_IOERR_DELETE);
  return real_vfs->xDelete(real_vfs, name, sync_directory);
}
int vfs_access(sqlite3_vfs*, const char* name, int flags, int* out) {
  return real_vfs->xAccess(real_vfs, name, flags, out);
}
int vfs_full_pathname(sqlite3_vfs*, const char* name, int size, char* out) {
  return real_vfs->xFullPathname(real_vfs, name, size, out);
}
void* vfs_dl_open(sqlite3_vfs*, const char* name) { return real_vfs->xDlOpen(real_vfs, name); }
void vfs_dl_error(sqlite3_vfs*, int size, char* out) { real_vfs->xDlError(real_vfs, size, out); }
void (*vfs_dl_sym(sqlite3_vfs*, void* handle, const char* symbol))(void) {
  return real_vfs->xDlSym(real_vfs, handle, symbol);
}
void vfs_dl_close(sqlite3_vfs*, void* handle) { real_vfs->xDlClose(real_vfs, handle); }
int vfs_randomness(sqlite3_vfs*, int size, char* out) { return real_vfs->xRandomness(real_vfs, size, out); }
int vfs_sleep(sqlite3_vfs*, int microseconds) { return real_vfs->xSleep(real_vfs, microseconds); }
int vfs_current_time(sqlite3_vfs*, double* out) { return real_vfs->xCurrentTime(real_vfs, out); }
int vfs_get_last_error(sqlite3_vfs*, int size, char* out) { return real_vfs->xGetLastError(real_vfs, size, out); }
int vfs_current_time_int64(sqlite3_vfs*, sqlite3_int64* out) { return real_vfs->xCurrentTimeInt64(real_vfs, out); }

sqlite3_vfs vfs = {};

}  // namespace

const char* catalog_vfs_name() {
  static std::once_flag once;
  std::call_once(once, [] {
    real_vfs = sqlite3_vfs_find(nullptr);
    vfs.iVersion = 2;
    vfs.szOsFile = static_cast<int>(sizeof(CheckedFile)) + real_vfs->szOsFile;
    vfs.mxPathname = real_vfs->mxPathname;
    vfs.zName = "deltavm-catalog";
    vfs.xOpen = vfs_open;
    vfs.xDelete = vfs_delete;
    vfs.xAccess = vfs_access;
    vfs.xFullPathname = vfs_full_pathname;
    vfs.xDlOpen = vfs_dl_open;
    vfs.xDlError = vfs_dl_error;
    vfs.xDlSym = vfs_dl_sym;
    vfs.xDlClose = vfs_dl_close;
    vfs.xRandomness = vfs_randomness;
    vfs.xSleep = vfs_sleep;
    vfs.xCurrentTime = vfs_current_time;
    vfs.xGetLastError = vfs_get_last_error;
    vfs.xCurrentTimeInt64 = vfs_current_time_int64;
    sqlite3_vfs_register(&vfs, 0);
  });
  return vfs.zName;
}

}  // namespace deltavm
