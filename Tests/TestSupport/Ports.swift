import NIOCore
import NIOPosix

/// A free loopback port outside Linux's ephemeral range (32768-60999), so that no other
/// test's server bound to port 0 is handed it meanwhile: for a peer that must be down, or
/// for a child process to bind.
public func unusedPort() async throws -> Int {
    while true {
        let port = Int.random(in: 20_000..<32_000)
        if let channel = try? await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .bind(host: "127.0.0.1", port: port).get() {
            try await channel.close()
            return port
        }
    }
}
