import NIOCore
import NIOPosix
import Synchronization

/// Ports handed out in this process: each at most once.
private let handedOut = Mutex<Set<Int>>([])

/// A free loopback port outside Linux's ephemeral range (32768-60999), so that no other
/// test's server bound to port 0 is handed it meanwhile: for a peer that must be down, or
/// for a child process to bind.
public func unusedPort() async throws -> Int {
    try await unusedPorts(1).lowerBound
}

/// `count` consecutive free loopback ports, outside the ephemeral range. No port is handed
/// out twice in one test run: a test's port that must be closed was once answered by the
/// routing service another test had started on the same port.
public func unusedPorts(_ count: Int) async throws -> ClosedRange<Int> {
    while true {
        let start = Int.random(in: 20_000..<(32_000 - count))
        let ports = start...(start + count - 1)
        guard handedOut.withLock({ taken in
            guard ports.allSatisfy({ !taken.contains($0) }) else { return false }
            taken.formUnion(ports)
            return true
        }) else { continue }
        var free = true
        for port in ports where free {
            if let channel = try? await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .bind(host: "127.0.0.1", port: port).get() {
                try await channel.close()
            } else {
                free = false
            }
        }
        if free { return ports }
    }
}
