import ArgumentParser
import Contracts
import Foundation
import Histogram
import LoadTest
import NIOCore
import NIOPosix
import RPC
import Rules
import Synchronization

/// `arbiter load`: the decision service's load generator.
struct Load: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Drive Decide (and ReportOutcome) against a decision service; print throughput, errors and latency percentiles.",
        discussion: """
            Open loop at --rate calls/s (latency counted from each call's intended start, so a stall is
            charged to every call it delayed), or closed loop with --concurrency calls in flight when
            --rate is 0. Persons are drawn uniformly from load-p0 … load-p<persons-1>; --seed-profile
            gives them traits and consent first, --actions puts a catalog in place.
            Examples:
              arbiter load --rate 3000 --duration 60 --warmup 5 --actions 50 --seed-profile 127.0.0.1:7102
              arbiter load --rate 0 --concurrency 64 --duration 20 --json result.json --hdr decide.hgrm
            """)

    @Option(help: "The decision service, host:port.") var address = "127.0.0.1:7103"
    @Option(help: "Calls per second (open loop); 0: closed loop.") var rate = 1000.0
    @Option(help: "Calls in flight at most (open loop: a call due when all are taken starts late, its lateness counted) or always (closed loop).") var concurrency = 64
    @Option(help: "Connections.") var connections = 8
    @Option(help: "Event-loop threads the connections are spread over. On a machine shared with the services, one wakes least often (each wake-up of a sleeping thread costs CPU the services wait for); raise it when the generator itself is the limit.") var threads = 1
    @Option(help: "Seconds measured.") var duration = 30.0
    @Option(help: "Seconds of warm-up at the same load, not measured.") var warmup = 5.0
    @Option(help: "Persons drawn from.") var persons = 100_000
    @Option(help: "Placement of every Decide.") var placement = "home"
    @Option(help: "Share of calls that report a click on an earlier decision (0…1), spread evenly.") var outcomeRatio = 0.1
    @Option(help: "An outcome names one of the latest this many decisions answered, drawn at random (300,000: the last 100 s at 3,000/s; the decision service keeps the latest 100,000 in memory).")
    var outcomeWindow = 300_000
    @Option(help: "Upsert this many generic actions first (0: use the catalog as it is).") var actions = 0
    @Option(help: "A profile service (host:port) to give every person traits and consent first.") var seedProfile: String?
    @Option(help: "Write the figures as JSON to this file.") var json: String?
    @Option(help: "Write Decide's latency percentile distribution (every Decide, degraded or not; HdrHistogram text, ms) to this file.") var hdr: String?
    @Option(help: "File holding the token sent as authorization: Bearer <token>.") var authTokenFile: String?
    @Option(help: "Write an HTML page with the latency-by-percentile chart to this file.") var html: String?
    @Option(help: "Write the latency over time to this file (CSV: start_s, calls, p50_us, p99_us, max_us per --timeline-interval, by when calls started), and print the worst interval.") var timeline: String?
    @Option(help: "Seconds per line of --timeline.") var timelineInterval = 1.0
    @Flag(help: "With --actions: cap each action at 3 offers a week per person, and every person at 20 a day (the contact policy), so that Decide counts each person's offers.") var caps = false
    @Flag(help: "Only seed (--seed-profile, --actions), then exit.") var seedOnly = false

    static func cap(_ scope: DecisionV1.Cap.Scope, max: UInt32, days: Int64) -> DecisionV1.Cap {
        var cap = DecisionV1.Cap()
        cap.scope = scope
        cap.max = max
        cap.windowSeconds = days * 86_400
        return cap
    }

    func validate() throws {
        guard rate >= 0, concurrency >= 1, connections >= 1, threads >= 1, duration > 0, warmup >= 0, persons >= 1 else {
            throw ValidationError("--rate must be ≥ 0, --concurrency, --connections, --threads and --persons ≥ 1, --duration > 0, --warmup ≥ 0")
        }
        guard timelineInterval >= 0.001 else { throw ValidationError("--timeline-interval must be at least 0.001 s") }
        guard (0...1).contains(outcomeRatio) else { throw ValidationError("--outcome-ratio must be between 0 and 1") }
        guard outcomeWindow >= 1 else { throw ValidationError("--outcome-window must be at least 1") }
        if caps && actions == 0 { throw ValidationError("--caps needs --actions (it caps the actions it puts in place)") }
    }

    func run() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: threads)
        defer { group.shutdownGracefully { _ in } }
        let client = try makeClient(address, tokenFile: authTokenFile, group: group)
        defer { client.close() }
        if let seedProfile { try await seed(profile: try makeClient(seedProfile, tokenFile: authTokenFile)) }
        if actions > 0 {
            for a in 0..<actions {
                var upsert = DecisionV1.UpsertActionRequest()
                var action = DecisionV1.Action()
                action.id = "load-action-\(a)"
                action.value = Double(5 + (a * 37) % 50)
                action.channels = a % 2 == 0 ? [.email, .push] : []
                action.consentPurpose = a % 2 == 0 ? "marketing" : ""
                action.eligibility = ["", "trait.tier == \"gold\"", "context.device == \"ios\""][a % 3]
                if caps { action.caps = [Self.cap(.action, max: 3, days: 7)] }
                upsert.action = action
                _ = try await client.call(DecisionV1.Decision.upsertAction, upsert, timeout: .seconds(10))
            }
            if caps {
                var policy = DecisionV1.ContactPolicy()
                policy.caps = [Self.cap(.total, max: 20, days: 1)]
                _ = try await client.call(DecisionV1.Decision.setContactPolicy, policy, timeout: .seconds(10))
            }
            say("catalog: \(actions) actions" + (caps ? ", each at most 3 offers a week per person; at most 20 offers a day per person" : ""))
        }
        if seedOnly { return }

        let recent = RecentDecisions(capacity: outcomeWindow)
        let (persons, placement, ratio) = (self.persons, self.placement, outcomeRatio)
        // Call i of a run draws from SplitMix64 seeded by the run's base and i: no system call
        // per number (the system generator made three getrandom calls per Decide).
        let calls: @Sendable (UInt64) -> @Sendable (Int) -> LoadTest.WireCall = { base in { i in
            var random = SplitMix64(seed: base &+ UInt64(i))
            // Exactly `ratio` of the calls, spread evenly (not drawn at random), so that the
            // Decides offered are the rate's share to the call: a goal's rate is then met or not.
            if ratio > 0, Int(Double(i + 1) * ratio) > Int(Double(i) * ratio), let (decision, action) = recent.any(using: &random) {
                var outcome = DecisionV1.ReportOutcomeRequest()
                outcome.outcomeId = "load-\(decision)-\(i)"
                outcome.decisionId = decision
                outcome.actionId = action
                outcome.outcome = .click
                return LoadTest.WireCall(DecisionV1.Decision.reportOutcome, payload: outcome.serializedBytes())
            }
            var decide = DecisionV1.DecideRequest()
            var ref = CommonV1.PersonRef()
            ref.ref = .personId("load-p\(random.int(persons))")
            decide.person = ref
            decide.placement = placement
            decide.context = ["device": random.int(2) == 0 ? "ios" : "web"]
            return LoadTest.WireCall(DecisionV1.Decision.decide, payload: decide.serializedBytes())
        } }
        let answered: @Sendable (LoadTest.WireCall, [UInt8]) throws -> String = { call, payload in
            guard call.method.method == DecisionV1.Decision.decide.method else { return call.method.method }
            let response = try DecisionV1.DecideResponse(serializedBytes: payload)  // if not, an error (INTERNAL)
            if let first = response.actions.first { recent.add(response.decisionId, first.actionId) }
            return response.degraded ? "Decide (degraded)" : "Decide"
        }
        let (host, port) = try hostAndPort(address)
        let metadata = RPCClientConfiguration.withToken(try readToken(authTokenFile)).metadata
        let mode = rate > 0 ? String(format: "open loop at %.0f/s", rate) : "closed loop"
        if warmup > 0 {
            say("warm-up: \(Int(warmup)) s, \(mode)")
            _ = try await LoadTest.drive(host: host, port: port, connections: connections, group: group, seconds: warmup,
                                         rate: rate > 0 ? rate : nil, concurrency: concurrency, metadata: metadata,
                                         call: calls(.random(in: .min ... .max)), answered: answered)
        }
        say("measuring: \(Int(duration)) s, \(mode), \(concurrency) in flight at most, \(connections) connections")
        let result = try await LoadTest.drive(host: host, port: port, connections: connections, group: group, seconds: duration,
                                              rate: rate > 0 ? rate : nil, concurrency: concurrency, metadata: metadata,
                                              timeline: timeline != nil, call: calls(.random(in: .min ... .max)), answered: answered)
        say("all calls: " + LoadTest.Result.line(result.total, seconds: result.seconds))
        for kind in result.histograms.keys.sorted() {
            say("  \(kind): " + LoadTest.Result.line(result.histograms[kind]!, seconds: result.seconds))
        }
        // A degraded answer is a decision too: the figures a Decide goal is held to.
        let decisions = result.merged(["Decide", "Decide (degraded)"])
        if result.histograms["Decide (degraded)"] != nil {
            say("  every Decide, degraded or not: " + LoadTest.Result.line(decisions, seconds: result.seconds))
        }
        if let line = result.latenessLine { say(line) }
        if let line = result.hostCPULine { say(line) }
        say("errors: " + (result.errors.isEmpty ? "none" : result.errors.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")))
        if let json {
            var object = result.json
            object["mode"] = mode
            object["target_rate"] = rate
            object["decisions"] = result.figures(decisions)
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
            try data.write(to: URL(fileURLWithPath: json))
            say("wrote \(json)")
        }
        if let hdr {
            var text = ""
            let decide = decisions.totalCount > 0 ? decisions : result.total
            decide.outputPercentileDistribution(to: &text, outputValueUnitScalingRatio: 1000)
            try Data(text.utf8).write(to: URL(fileURLWithPath: hdr))
            say("wrote \(hdr) (latency in ms)")
        }
        if let timeline {
            let intervals = result.timeline(every: timelineInterval)
            try Data(LoadTest.Result.csv(intervals).utf8).write(to: URL(fileURLWithPath: timeline))
            if let worst = intervals.max(by: { $0.p99Us < $1.p99Us }) {
                let median = intervals.map(\.p99Us).sorted()[intervals.count / 2]
                let slow = intervals.filter { $0.p99Us > 2 * median }.count
                say("wrote \(timeline): " + String(format: "worst interval at %.3f s (p99 %u us, max %u us); %d of %d intervals have a p99 over twice the median interval's",
                                                     worst.start, worst.p99Us, worst.maxUs, slow, intervals.count))
            }
        }
        if let html {
            try Data(result.html(title: "arbiter load: \(mode), \(Int(duration)) s").utf8).write(to: URL(fileURLWithPath: html))
            say("wrote \(html)")
        }
    }

    /// Gives every person a tier and marketing consent on email through the profile service.
    func seed(profile: RPCClient) async throws {
        defer { profile.close() }
        let started = ContinuousClock.now
        let persons = self.persons
        try await LoadTest.forEach(persons, workers: 16) { p in
            var traits = ProfileV1.SetTraitsRequest()
            var ref = CommonV1.PersonRef()
            ref.ref = .personId("load-p\(p)")
            traits.person = ref
            var tier = CommonV1.Field()
            tier.name = "tier"
            var value = CommonV1.Value()
            value.kind = .stringValue(["gold", "silver", "bronze"][p % 3])
            tier.value = value
            traits.traits = [tier]
            traits.source = "arbiter-load"
            _ = try await profile.call(ProfileV1.Profile.setTraits, traits, timeout: .seconds(10))
            var consent = ProfileV1.SetConsentRequest()
            consent.person = ref
            var record = ProfileV1.ConsentRecord()
            record.purpose = "marketing"
            record.channel = .email
            record.granted = p % 4 != 0
            record.source = "arbiter-load"
            consent.consents = [record]
            _ = try await profile.call(ProfileV1.Profile.setConsent, consent, timeout: .seconds(10))
        }
        say(String(format: "seeded %d persons in the profile service in %.1f s", persons, (ContinuousClock.now - started) / .seconds(1)))
    }
}

/// The latest decisions answered that chose an action (id and first action), in a ring, for
/// outcomes to name.
final class RecentDecisions: Sendable {
    private let capacity: Int
    private let ring = Mutex<(items: [(String, String)], next: Int)>(([], 0))

    init(capacity: Int) {
        self.capacity = max(1, capacity)
    }

    func add(_ decision: String, _ action: String) {
        ring.withLock { ring in
            if ring.items.count < capacity { ring.items.append((decision, action)) } else { ring.items[ring.next] = (decision, action) }
            ring.next = (ring.next + 1) % capacity
        }
    }

    func any(using random: inout SplitMix64) -> (String, String)? {
        ring.withLock { $0.items.isEmpty ? nil : $0.items[random.int($0.items.count)] }
    }
}
