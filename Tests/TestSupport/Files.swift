import Foundation

/// A new empty directory, unique to the call (never one a test run before used: a store left
/// there would answer for the last run), inside this test process's own temporary directory.
public func temporaryDirectory(_ prefix: String = "arbiter-test") -> String {
    let path = TestFiles.root + "/\(prefix)-\(UUID().uuidString)"
    try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// One directory under the system's temporary directory per test process, removed when the
/// process exits: stores, WALs and sockets' files do not pile up over runs.
enum TestFiles {
    static let root: String = {
        let path = NSTemporaryDirectory() + "/arbiter-tests-\(getpid())-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        atexit { TestFiles.remove() }
        return path
    }()

    static func remove() { try? FileManager.default.removeItem(atPath: root) }
}

/// Whether any of `files` (in `directory`) holds `needle`'s UTF-8 bytes: for proving that
/// erased data is gone from a SQLite file and its WAL, read as raw bytes.
public func filesContain(_ needle: String, in directory: String, files: [String]) -> Bool {
    let bytes = Array(needle.utf8)
    return files.contains { file in
        guard let data = FileManager.default.contents(atPath: directory + "/" + file) else { return false }
        return [UInt8](data).contains(subsequence: bytes)
    }
}

extension Array where Element == UInt8 {
    /// Whether `needle` occurs in the array.
    public func contains(subsequence needle: [UInt8]) -> Bool {
        guard !needle.isEmpty, count >= needle.count else { return false }
        return indices.dropLast(needle.count - 1).contains { self[$0..<$0 + needle.count].elementsEqual(needle) }
    }
}
