import Contracts
import Foundation
import LoadTest
import Rules
public import RPC
import Synchronization

/// The parts of `arbiter demo` beyond the decision simulation: identities with shared
/// devices, typos and anonymous visitors who later log in, behavioural events with
/// features, and the report (text and an HTML page with charts).
extension Simulation {
    public struct IdentityStats: Sendable {
        public var links = 0
        public var persons = 0
        /// Anonymous visitors merged into a known customer when they logged in.
        public var merges = 0
        /// Merges a rule refused (a device shared by two customers), by rule.
        public var conflicts: [String: Int] = [:]
        /// Mistyped email addresses attached to their person through a known phone number.
        public var typos = 0
    }

    static func identifier(_ type: String, _ value: String) -> CommonV1.Identifier {
        var id = CommonV1.Identifier()
        id.type = type
        id.value = value
        return id
    }

    /// Links every person's identifiers through the identity service the way they would
    /// arrive: a fifth browse anonymously first (a cookie, with page views) and log in
    /// later; every tenth pair of customers shares a tablet; one in twenty later types
    /// their email wrong next to a known phone number.
    public func linkIdentities(_ identity: RPCClient, profile: RPCClient, workers: Int = 16,
                               progress: @escaping @Sendable (Int) -> Void = { _ in }) async throws -> IdentityStats {
        let stats = Mutex(IdentityStats())
        let persons = Mutex(Set<String>())
        let done = Mutex(0)
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        try await LoadTest.forEach(world.persons.count, workers: workers) { [self] n in
            let person = world.persons[n]
            func link(_ ids: [CommonV1.Identifier], _ source: String) async throws -> IdentityV1.LinkResponse {
                var request = IdentityV1.LinkRequest()
                request.identifiers = ids
                request.source = source
                let response = try await identity.call(IdentityV1.Identity.link, request, timeout: timeout)
                stats.withLock { s in
                    s.links += 1
                    s.merges += response.mergedPersonIds.count
                    for conflict in response.conflicts { s.conflicts[conflict.rule, default: 0] += 1 }
                }
                return response
            }
            let customer = Self.identifier("customer_id", person.id)
            let cookie = Self.identifier("cookie_id", "cookie-\(person.id)")
            if n % 5 == 0 {
                _ = try await link([cookie], "web")
                var track = ProfileV1.TrackRequest()
                var ref = CommonV1.PersonRef()
                var list = CommonV1.IdentifierList()
                list.identifiers = [cookie]
                ref.ref = .identifiers(list)
                track.events = (0..<2).map { k in
                    var event = ProfileV1.Event()
                    event.eventId = "anon-\(person.id)-\(k)"
                    event.person = ref
                    event.type = "page_view"
                    event.occurredAtMs = now - Int64(3 - k) * 3_600_000
                    return event
                }
                _ = try await profile.call(ProfileV1.Profile.track, track, timeout: timeout)
            }
            let known = try await link([customer, Self.identifier("email", person.email), Self.identifier("phone", person.phone)], "crm")
            persons.withLock { _ = $0.insert(known.personId) }
            let device = n % 10 < 2 ? "tablet-shared-\(n / 10)" : "device-\(person.id)"
            _ = try await link([customer, Self.identifier("device_id", device)], "app")
            if n % 5 == 0 { _ = try await link([cookie, customer], "web-login") }
            if n % 20 == 7 {
                let typo = person.email.replacingOccurrences(of: "@example.com", with: "@exmaple.com")
                _ = try await link([Self.identifier("email", typo), Self.identifier("phone", person.phone)], "call-centre")
                stats.withLock { $0.typos += 1 }
            }
            progress(done.withLock { $0 += 1; return $0 })
        }
        return stats.withLock { s in
            s.persons = persons.withLock { $0.count }
            return s
        }
    }

    /// Defines three features and tracks page views and purchases for every person (by customer id).
    public func trackEvents(_ profile: RPCClient, workers: Int = 16, progress: @escaping @Sendable (Int) -> Void = { _ in }) async throws -> Int {
        for (name, type, aggregation, window, halfLife) in [
            ("page_views_7d", "page_view", ProfileV1.FeatureDefinition.Aggregation.count, Int64(7 * 86_400), Int64(0)),
            ("purchases_30d", "purchase", .count, 30 * 86_400, 0),
            ("engagement", "page_view", .decayedSum, 0, 3 * 86_400),
        ] {
            var request = ProfileV1.DefineFeatureRequest()
            var feature = ProfileV1.FeatureDefinition()
            feature.name = name
            feature.eventType = type
            feature.aggregation = aggregation
            feature.windowSeconds = window
            feature.halfLifeSeconds = halfLife
            request.feature = feature
            request.backfill = true
            _ = try await profile.call(ProfileV1.Profile.defineFeature, request, timeout: timeout)
        }
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        let accepted = Mutex(0)
        let done = Mutex(0)
        try await LoadTest.forEach(world.persons.count, workers: workers) { [self] n in
            let person = world.persons[n]
            var random = SplitMix64(seed: UInt64(n) &* 0xD1B5_4A32_D192_ED03)
            var track = ProfileV1.TrackRequest()
            let views = 1 + random.int(6)
            for k in 0..<views {
                var event = ProfileV1.Event()
                event.eventId = "view-\(person.id)-\(k)"
                event.person = ref(person)
                event.type = "page_view"
                event.occurredAtMs = now - Int64(random.int(14 * 86_400)) * 1000
                event.properties = [CommonV1.Field("page", .string(["home", "offers", "account", "help"][random.int(4)]))]
                track.events.append(event)
            }
            if random.unit() < 0.3 {
                var event = ProfileV1.Event()
                event.eventId = "purchase-\(person.id)"
                event.person = ref(person)
                event.type = "purchase"
                event.occurredAtMs = now - Int64(random.int(20 * 86_400)) * 1000
                event.value = Double(10 + random.int(190))
                track.events.append(event)
            }
            let response = try await profile.call(ProfileV1.Profile.track, track, timeout: timeout)
            accepted.withLock { $0 += Int(response.accepted) }
            progress(done.withLock { $0 += 1; return $0 })
        }
        return accepted.withLock { $0 }
    }
}

/// Everything `arbiter demo` reports.
public struct DemoReport: Sendable {
    public var identity = Simulation.IdentityStats()
    public var events = 0
    public var run = Simulation.Run()
    public var measured: Simulation.Measured
    public var summary: [String]

    public init(identity: Simulation.IdentityStats, events: Int, run: Simulation.Run, measured: Simulation.Measured, summary: [String]) {
        self.identity = identity
        self.events = events
        self.run = run
        self.measured = measured
        self.summary = summary
    }

    /// The report as text (what the terminal shows).
    public var text: [String] {
        var lines = ["identities: \(identity.links) links → \(identity.persons) customers; \(identity.merges) anonymous visitors merged at login; "
            + "\(identity.typos) mistyped emails attached by phone; merges refused: "
            + (identity.conflicts.isEmpty ? "none" : identity.conflicts.sorted { $0.key < $1.key }.map { "\($0.value) (\($0.key))" }.joined(separator: ", ")),
                     "events: \(events) accepted", ""]
        lines += summary
        lines.append("")
        lines.append("deliveries planned (every fourth decision goes through routing; each is sent at its planned time, after quiet hours and at the person's best hour): "
            + (run.deliveries.isEmpty ? "none" : run.deliveries.sorted { $0.value > $1.value }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
            + (run.deliveryErrors > 0 ? "; \(run.deliveryErrors) could not be routed" : ""))
        lines.append("degraded decisions: \(run.degraded)")
        return lines
    }

    /// A self-contained HTML page with the same figures and SVG charts.
    public var html: String {
        func esc(_ s: String) -> String {
            s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
        }
        func bars(_ rows: [(String, Double, String)], unit: String, digits: Int = 3) -> String {
            let top = max(rows.map(\.1).max() ?? 1, 1e-9)
            var svg = "<svg width=\"840\" height=\"\(rows.count * 30 + 10)\" role=\"img\">"
            for (i, (label, value, color)) in rows.enumerated() {
                let y = i * 30 + 5
                let w = Int(420 * value / top)
                svg += "<text x=\"0\" y=\"\(y + 17)\" font-size=\"13\">\(esc(label))</text>"
                svg += "<rect x=\"200\" y=\"\(y)\" width=\"\(max(w, 1))\" height=\"22\" fill=\"\(color)\"/>"
                svg += "<text x=\"\(206 + w)\" y=\"\(y + 17)\" font-size=\"13\">\(String(format: "%.\(digits)f", value)) \(unit)</text>"
            }
            return svg + "</svg>"
        }
        let policies: [(String, Double, String)] =
            [("Arbiter (learned)", run.treated.valuePerDecision, "#2b7a4b"), ("Arbiter (as run)", run.arbiter.valuePerDecision, "#4caf7a")]
            + Simulation.baselines.map { ($0.replacingOccurrences(of: "_", with: " "), run.baselines[$0]?.valuePerDecision ?? 0, "#8a94a6") }
            + [("best possible", run.oracle.valuePerDecision, "#c9a227")]
        let lift = measured.lift
        let trueLift = run.treated.expectedRate - run.defaultForAll.expectedRate
        let liftRows: [(String, Double, String)] = [("control (holdout)", lift.control?.conversionRate ?? 0, "#8a94a6"),
                                                    ("treated (learned)", lift.treated?.conversionRate ?? 0, "#2b7a4b")]
        let deliveries = run.deliveries.sorted { $0.value > $1.value }.map { ($0.key, Double($0.value), $0.key.hasPrefix("suppressed") ? "#b85c5c" : "#3d6fb6") }
        var page = """
            <!doctype html><html><head><meta charset="utf-8"><title>Arbiter demo</title>
            <style>body{font-family:system-ui,sans-serif;max-width:900px;margin:2em auto;color:#222}
            h2{margin-top:1.6em}pre{background:#f5f5f5;padding:1em;overflow-x:auto;font-size:12px}</style></head><body>
            <h1>Arbiter demo</h1>
            <p>\(run.arbiter.decisions) decisions through the real services in \(String(format: "%.1f", run.seconds)) s; \(run.degraded) degraded.</p>
            <h2>Value per decision, against the baselines</h2>
            <p>Each policy faced the same persons, eligible offers and random draws; outcomes come from a hidden truth the services never saw.</p>
            \(bars(policies, unit: "per decision"))
            <h2>Lift against the global holdout</h2>
            \(bars(liftRows, unit: "conversion rate"))
            <p>Measured lift \(String(format: "%.4f", lift.absoluteLift)) (95 % interval \(String(format: "%.4f", lift.absoluteLiftCi95?.low ?? 0)) to \(String(format: "%.4f", lift.absoluteLiftCi95?.high ?? 0))); the truth's lift \(String(format: "%.4f", trueLift)). Sample-ratio check p = \(String(format: "%.3g", lift.srmPValue))\(lift.srmWarning ? " — <b>the split is broken</b>" : "").</p>
            <h2>Deliveries by channel</h2>
            \(deliveries.isEmpty ? "<p>none</p>" : bars(deliveries, unit: "deliveries", digits: 0))
            <h2>The full report</h2>
            <pre>
            """
        page += text.map(esc).joined(separator: "\n")
        page += "</pre></body></html>\n"
        return page
    }
}
