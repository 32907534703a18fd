import Foundation
import Logging
import ServiceRuntime
import Testing

@Suite("JSON log lines")
struct JSONLogHandlerTests {
    /// Everything written to a pipe by `body`, read on another thread while it writes, slowly
    /// (4 KiB at a time with a pause), as a log collector under load does: the pipe fills, and
    /// a writer blocked on a full pipe had written only part of its line.
    func captured(_ body: (Int32) -> Void) -> [Substring] {
        var fds: [Int32] = [0, 0]
        precondition(pipe(&fds) == 0)
        let collected = UnsafeMutablePointer<[UInt8]>.allocate(capacity: 1)
        collected.initialize(to: [])
        defer { collected.deinitialize(count: 1); collected.deallocate() }
        let done = DispatchSemaphore(value: 0)
        nonisolated(unsafe) let sink = collected
        let readEnd = fds[0]
        Thread.detachNewThread {
            var buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = buffer.withUnsafeMutableBytes { read(readEnd, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                sink.pointee += buffer[0..<n]
                usleep(20)
            }
            done.signal()
        }
        body(fds[1])
        close(fds[1])
        done.wait()
        close(fds[0])
        return String(decoding: collected.pointee, as: UTF8.self).split(separator: "\n")
    }

    @Test("one JSON object per line, with the metadata, and control characters escaped")
    func oneObjectPerLine() throws {
        let lines = captured { fd in
            var handler = JSONLogHandler(label: "arbiter-test", descriptor: fd)
            handler.metadata["rpc.code"] = "OK"
            Logger(label: "arbiter-test") { _ in handler }.warning("two\nlines\t\u{1}", metadata: ["rpc.method": "Decide"])
        }
        #expect(lines.count == 1)
        let object = try JSONSerialization.jsonObject(with: Data(lines[0].utf8)) as? [String: String]
        #expect(object?["message"] == "two\nlines\t\u{1}" && object?["level"] == "warning" && object?["logger"] == "arbiter-test")
        #expect(object?["rpc.code"] == "OK" && object?["rpc.method"] == "Decide")
        #expect(object?["ts"]?.hasSuffix("Z") == true)
    }

    @Test("long lines written from many threads at once stay whole")
    func longLinesDoNotInterleave() throws {
        let threads = 8, perThread = 25
        let lines = captured { fd in
            let handler = JSONLogHandler(label: "arbiter-test", descriptor: fd)
            DispatchQueue.concurrentPerform(iterations: threads) { thread in
                let logger = Logger(label: "arbiter-test") { _ in handler }
                // 20 KB each, well past the 4 KiB a pipe writes atomically.
                let filler = String(repeating: Character(UnicodeScalar(UInt8(65 + thread))), count: 20_000)
                for i in 0..<perThread { logger.error("\(thread) \(i) \(filler)") }
            }
        }
        #expect(lines.count == threads * perThread)
        var seen = Set<String>()
        for line in lines {
            let message = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: String])["message"]
            let parts = try #require(message?.split(separator: " "))
            #expect(parts.count == 3 && parts[2].count == 20_000 && Set(parts[2]).count == 1)
            seen.insert("\(parts[0]) \(parts[1])")
        }
        #expect(seen.count == threads * perThread)
    }
}
