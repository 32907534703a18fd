#include "CSQLiteConfig.h"
#include <sqlite3.h>

static int memstatus_result = -1;

/// Runs as the process loads, before any connection opens: `sqlite3_config` works only
/// before SQLite initializes. With statistics on (SQLite's default), every allocation and
/// free of every connection takes one process-wide mutex; the writer, the checkpointers
/// and the readers of a service then wait on each other there.
__attribute__((constructor)) static void arbiter_sqlite_configure(void) {
    memstatus_result = sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0);
}

int arbiter_sqlite_memstatus_result(void) { return memstatus_result; }
