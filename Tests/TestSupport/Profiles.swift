import Contracts
import ProfileService
import RPC
import Rules

/// A profile service on a real loopback server, with a few persons in it.
public func withProfile<T: Sendable>(clock: TestClock, _ body: @Sendable (ProfileService, RPCClient) async throws -> T) async throws -> T {
    let store = try ProfileStore(directory: temporaryDirectory("profile"))
    let profile = ProfileService(store: store, clock: clock.read)
    return try await withRPCServer(configure: { $0.handlerExecution = .concurrentPool }, services: [profile]) { _, port in
        let client = RPCClient(host: "127.0.0.1", port: port)
        defer { client.close() }
        return try await body(profile, client)
    }
}

/// Seeds the profile store directly, for tests of the services that read profiles.
public func seed(_ store: ProfileStore, _ person: String, traits: [(name: String, value: RuleValue)] = [],
                 consent: [(purpose: String, channel: CommonV1.Channel, granted: Bool)] = [], at: Int64) throws {
    if !traits.isEmpty { _ = try store.setTraits(person: person, traits, source: "test", updatedAtMs: at) }
    if !consent.isEmpty {
        try store.setConsent(person: person, consent.map {
            ProfileStore.Consent(purpose: $0.purpose, channel: $0.channel.rawValue, granted: $0.granted, source: "test", atMs: at)
        })
    }
}
