import Foundation
import Logging
import NIOCore
import Prometheus
import ServiceLifecycle
import ServiceRuntime
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite("admin port")
struct AdminServerTests {
    /// A blocking TCP connection to 127.0.0.1:`port` (nil when it cannot connect).
    func connect(_ port: Int) -> Int32? {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else {
            close(fd)
            return nil
        }
        return fd
    }

    /// Everything the server sends until it closes (or 10 s pass).
    func readAll(_ fd: Int32) -> String {
        var data: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &buffer, buffer.count)
            guard n > 0 else { break }
            data += buffer[0..<n]
        }
        return String(decoding: data, as: UTF8.self)
    }

    func withAdmin(requestTimeout: TimeAmount = .seconds(10), _ body: @Sendable (Int) async throws -> Void) async throws {
        let logger = Logger(label: "admin-test")
        let admin = AdminServer(host: "127.0.0.1", port: 0, registry: PrometheusCollectorRegistry(), logger: logger,
                                requestTimeout: requestTimeout, isReady: { true })
        let services = ServiceGroup(services: [admin], logger: logger)
        async let running: Void = services.run()
        let port = try await admin.listeningAddress().port!
        do {
            try await body(port)
        } catch {
            await services.triggerGracefulShutdown()
            try await running
            throw error
        }
        await services.triggerGracefulShutdown()
        try await running
    }

    @Test("one answer per connection: pipelined requests that are never read cannot pile answers up in memory")
    func oneAnswerPerConnection() async throws {
        try await withAdmin { port in
            let fd = try #require(connect(port))
            defer { close(fd) }
            let requests = Array(String(repeating: "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", count: 500).utf8)
            #expect(write(fd, requests, requests.count) == requests.count)
            let answer = readAll(fd)
            // Before, keep-alive answered all 500, each held in memory until the client read it.
            #expect(answer.components(separatedBy: "HTTP/1.1 200 OK").count - 1 == 1, "\(answer.prefix(300))")
            #expect(answer.lowercased().contains("connection: close"))
        }
    }

    @Test("a connection that does not send its request whole in time is closed, however its bytes trickle")
    func requestTimeout() async throws {
        try await withAdmin(requestTimeout: .milliseconds(500)) { port in
            let fd = try #require(connect(port))
            defer { close(fd) }
            // Half a request, then a byte every 200 ms: each byte used to keep the slot (the
            // idle timeout restarts on every read).
            let start = ContinuousClock.now
            for byte in Array("GET /hea".utf8) {
                _ = send(fd, [byte], 1, Int32(MSG_NOSIGNAL))  // no SIGPIPE once the server has closed
                try await Task.sleep(for: .milliseconds(200))
                if ContinuousClock.now - start > .seconds(1) { break }
            }
            #expect(readAll(fd).isEmpty)  // closed without an answer, not after 10 s of reading
            #expect(ContinuousClock.now - start < .seconds(9))
            // A request sent whole is answered.
            let next = try #require(connect(port))
            defer { close(next) }
            let request = Array("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".utf8)
            _ = write(next, request, request.count)
            #expect(readAll(next).hasPrefix("HTTP/1.1 200 OK"))
        }
    }

    @Test("at most 64 connections are open at once; more are closed at once")
    func connectionLimit() async throws {
        try await withAdmin { port in
            var open: [Int32] = []
            defer { open.forEach { close($0) } }
            for _ in 0..<64 { open.append(try #require(connect(port))) }
            try await Task.sleep(for: .milliseconds(200))  // all accepted
            let extra = try #require(connect(port))
            defer { close(extra) }
            #expect(readAll(extra).isEmpty)  // closed without an answer
            // Once one closes, a new connection is served again.
            close(open.removeFirst())
            try await Task.sleep(for: .milliseconds(200))
            let next = try #require(connect(port))
            defer { close(next) }
            let request = Array("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".utf8)
            _ = write(next, request, request.count)
            #expect(readAll(next).hasPrefix("HTTP/1.1 200 OK"))
        }
    }
}
