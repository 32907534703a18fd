#ifndef ARBITER_CSQLITECONFIG_H
#define ARBITER_CSQLITECONFIG_H

/// What `sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0)` answered when this process loaded
/// (SQLITE_OK: SQLite keeps no allocation statistics, so its allocations take no lock
/// shared by every connection). Swift cannot call `sqlite3_config`: it is variadic.
int arbiter_sqlite_memstatus_result(void);

#endif
