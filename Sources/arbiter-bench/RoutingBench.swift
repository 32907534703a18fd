import ArgumentParser
import Contracts
import Foundation
import Logging
import ProfileService
import RoutingService
import RPC
import TestSupport

struct RoutingBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "routing",
        abstract: "Route against arbiter-routing's service (which reads arbiter-profile's over loopback), then drain its outbox to a local webhook receiver.")

    @Option(help: "Known persons (each with addresses, a time zone and consent in the profile store).") var persons = 100_000
    @Option(help: "Seconds of Route measurement.") var duration = 10.0
    @Option(help: "Route calls in flight.") var concurrency = 64
    @Option(help: "Connections to the routing service.") var connections = 4
    @Option(help: "Deliveries sent at once by the dispatcher.") var dispatchConcurrency = 64

    func run() async throws {
        let base = NSTemporaryDirectory() + "/arbiter-bench-routing-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: base) }

        let profileStore = try ProfileStore(directory: base + "/profile")
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        let seeding = ContinuousClock.now
        let zones = ["Europe/Paris", "America/New_York", "Asia/Tokyo", "UTC"]
        for p in 0..<persons {
            _ = try profileStore.setTraits(person: "p\(p)", [
                ("email", .string("p\(p)@example.com")), ("email_verified", .bool(true)), ("push_token", .string("tok-\(p)")),
                ("timezone", .string(zones[p % zones.count])),
            ], source: "bench", updatedAtMs: now)
            try profileStore.setConsent(person: "p\(p)", [1, 3, 5].map {
                ProfileStore.Consent(purpose: "marketing", channel: $0, granted: true, source: "bench", atMs: now)
            })
        }
        print(String(format: "seeded %d persons in %.1f s", persons, (ContinuousClock.now - seeding) / .seconds(1)))
        let (profileTask, profilePort) = try await Bench.serve(ProfileService(store: profileStore))
        defer { profileTask.cancel() }
        let profileClient = RPCClient(host: "127.0.0.1", port: profilePort)

        // Every channel posts to the local receiver; no quiet hours, so that every
        // delivery is due at once and the dispatch figure is the outbox's drain rate.
        let sink = try await WebhookSink.start()
        var configuration = RoutingConfiguration()
        configuration.webhook = .init(url: "http://127.0.0.1:\(sink.port)/deliveries")
        configuration.quietHoursStart = "00:00"
        configuration.quietHoursEnd = "00:00"
        configuration.dispatchConcurrency = dispatchConcurrency
        var logger = Logger(label: "bench")
        logger.logLevel = .error
        let store = try RoutingStore(directory: base + "/routing", configuration: configuration)
        let routing = try RoutingService(store: store, configuration: configuration, profile: profileClient,
                                         group: .singletonMultiThreadedEventLoopGroup, logger: logger)
        let (routingTask, port) = try await Bench.serve(routing)
        defer { routingTask.cancel() }
        let clients = Bench.loadClients(connections, port: port)
        let persons = self.persons
        // For scale: the profile read each Route makes, alone, at the same concurrency.
        let profileClients = Bench.loadClients(connections, port: profilePort)
        _ = try await Bench.measure("GetProfile (traits, consent) alone, for scale", profileClients, duration: min(duration, 5),
                                    concurrency: concurrency) { client, _ in
            var request = ProfileV1.GetProfileRequest()
            var ref = CommonV1.PersonRef()
            ref.ref = .personId("p\(Int.random(in: 0..<persons))")
            request.person = ref
            request.fields = ["traits", "consent"]
            _ = try await client.call(ProfileV1.Profile.getProfile, request, timeout: .seconds(5))
        }
        profileClients.forEach { $0.close() }
        let channels: [[CommonV1.Channel]] = [[], [.push, .email], [.email], [.webhook, .email]]
        let routed = try await Bench.measure("Route (normal urgency, caps checked)", clients, duration: duration, concurrency: concurrency) { client, i in
            var request = RoutingV1.RouteRequest()
            var ref = CommonV1.PersonRef()
            ref.ref = .personId("p\(Int.random(in: 0..<persons))")
            request.person = ref
            var message = RoutingV1.Message()
            message.templateId = "weekly-digest"
            message.variables = ["subject": "Your week", "items": "\(i % 10)"]
            request.message = message
            request.allowedChannels = channels[i % channels.count]
            request.purpose = "marketing"
            request.idempotencyKey = "bench-\(i)"
            _ = try await client.call(RoutingV1.Routing.route, request, timeout: .seconds(5))
        }
        let (scheduled, _) = try store.counts()
        print("outbox: \(scheduled) scheduled (the rest suppressed by caps)")

        // Dispatch: drain the outbox into the receiver.
        let start = ContinuousClock.now
        let dispatcher = Task { try await routing.dispatcher.run() }
        var remaining = scheduled
        while remaining > 0 && ContinuousClock.now - start < .seconds(600) {
            try await Task.sleep(for: .milliseconds(50))
            remaining = try store.counts().scheduled
        }
        let elapsed = (ContinuousClock.now - start) / .seconds(1)
        dispatcher.cancel()
        _ = try? await dispatcher.value
        let dispatched = Double(scheduled - remaining) / elapsed
        print(String(format: "Dispatch to a local webhook receiver: %d deliveries in %.2f s = %.0f deliveries/s (dispatch concurrency %d); receiver got %d distinct keys in %d requests, %d left",
                     scheduled - remaining, elapsed, dispatched, dispatchConcurrency, sink.distinctKeys.count, sink.answered, remaining))
        print(String(format: "summary: route %.0f/s (goal 5000), dispatch %.0f/s (goal 2000); rss %d MiB", routed, dispatched, rssMiB()))
        await routing.shutdown()
        await sink.close()
        clients.forEach { $0.close() }
        profileClient.close()
    }
}
