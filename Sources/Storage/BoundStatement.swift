import Foundation
public import GRDB
import GRDBSQLite

/// A value bound to a statement's parameter by `Statement.run(_:_:)`.
public enum BoundValue: Sendable {
    case text(String)
    case integer(Int64)
    case real(Double)
    case blob(Data)
    case null
}

extension Statement {
    /// Runs this statement (an INSERT, UPDATE or DELETE, not a SELECT) once with `values`
    /// bound to its parameters in order, then resets it. For the hottest write paths only:
    /// GRDB's `execute(arguments:)` first builds `StatementArguments` of boxed
    /// `DatabaseValue`s, which took about 40 % of a six-column insert (alone, 100,000 rows in
    /// one transaction: 2.2–2.5 µs bound here against 3.7–5.3 µs through GRDB). Errors are
    /// thrown as GRDB's `DatabaseError`; the statement stays usable after one. Values are
    /// stored exactly as GRDB stores them.
    public func run(_ db: Database, _ values: BoundValue...) throws {
        let statement = sqliteStatement
        // SQLITE_TRANSIENT: SQLite copies the bytes before the call returns.
        let transient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)
        precondition(values.count == Int(sqlite3_bind_parameter_count(statement)),
                     "\(values.count) values for \(sqlite3_bind_parameter_count(statement)) parameters in \(sql)")
        defer {
            sqlite3_reset(statement)
            sqlite3_clear_bindings(statement)
        }
        for (i, value) in values.enumerated() {
            let index = Int32(i + 1)
            let code: Int32
            switch value {
            case .text(let string):
                // As GRDB binds a String: a C string, so a NUL inside ends it, and a row
                // written here is found by a query whose arguments GRDB binds.
                code = string.withCString { sqlite3_bind_text(statement, index, $0, -1, transient) }
            case .integer(let integer):
                code = sqlite3_bind_int64(statement, index, integer)
            case .real(let real):
                code = sqlite3_bind_double(statement, index, real)
            case .blob(let data):
                code = data.withUnsafeBytes { sqlite3_bind_blob(statement, index, $0.baseAddress, Int32($0.count), transient) }
            case .null:
                code = sqlite3_bind_null(statement, index)
            }
            guard code == SQLITE_OK else {
                throw DatabaseError(resultCode: ResultCode(rawValue: code), message: "cannot bind parameter \(index)", sql: sql)
            }
        }
        switch sqlite3_step(statement) {
        case SQLITE_DONE:
            return
        case SQLITE_ROW:
            throw DatabaseError(resultCode: .SQLITE_MISUSE, message: "Statement.run is for statements that return no rows", sql: sql)
        default:
            throw DatabaseError(resultCode: ResultCode(rawValue: sqlite3_extended_errcode(db.sqliteConnection)),
                                message: String(cString: sqlite3_errmsg(db.sqliteConnection)), sql: sql)
        }
    }
}
