public import Contracts
import Foundation
import LoadTest
public import RPC
import Rules
import Synchronization

/// Drives a `World` through the real services over TCP: seeds the profiles and the
/// catalog, then decides once for each person, draws the outcome of whatever was chosen
/// from the hidden truth and reports conversions, so that the service learns. Alongside,
/// it plays baseline policies on the same persons, eligible sets and random draws (common
/// random numbers), and keeps the truth's expected values for every policy.
public struct Simulation: Sendable {
    public let world: World
    public let decision: RPCClient
    /// Address persons by their customer id through the identity service (the services
    /// resolve it) instead of by person id.
    public var byIdentifier = false
    public var placement = "home"
    public var timeout = Duration.seconds(10)

    public init(world: World, decision: RPCClient) {
        self.world = world
        self.decision = decision
    }

    /// How persons are named on the wire.
    public func ref(_ person: World.Person) -> CommonV1.PersonRef {
        var ref = CommonV1.PersonRef()
        if byIdentifier {
            var list = CommonV1.IdentifierList()
            var id = CommonV1.Identifier()
            id.type = "customer_id"
            id.value = person.id
            list.identifiers = [id]
            ref.ref = .identifiers(list)
        } else {
            ref.ref = .personId(person.id)
        }
        return ref
    }

    // MARK: - Seeding

    /// The life-stage segments, every person's traits and consent, through the profile service.
    public func seedProfiles(_ profile: RPCClient, workers: Int = 16, progress: @escaping @Sendable (Int) -> Void = { _ in }) async throws {
        for (name, rule) in World.segmentRules.sorted(by: { $0.key < $1.key }) {
            var request = ProfileV1.DefineSegmentRequest()
            var segment = ProfileV1.SegmentDefinition()
            segment.name = name
            segment.rule = rule
            request.segment = segment
            _ = try await profile.call(ProfileV1.Profile.defineSegment, request, timeout: timeout)
        }
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        let done = Mutex(0)
        try await LoadTest.forEach(world.persons.count, workers: workers) { [self] n in
            let person = world.persons[n]
            var traits = ProfileV1.SetTraitsRequest()
            traits.person = ref(person)
            traits.traits = world.traits(person)
            traits.source = "simulation"
            traits.updatedAtMs = now
            _ = try await profile.call(ProfileV1.Profile.setTraits, traits, timeout: timeout)
            var consent = ProfileV1.SetConsentRequest()
            consent.person = ref(person)
            consent.consents = world.consent(person, atMs: now)
            _ = try await profile.call(ProfileV1.Profile.setConsent, consent, timeout: timeout)
            progress(done.withLock { $0 += 1; return $0 })
        }
    }

    /// The world's offers in the decision service's catalog.
    public func seedCatalog() async throws {
        for offer in world.offers {
            var request = DecisionV1.UpsertActionRequest()
            request.action = offer.action
            _ = try await decision.call(DecisionV1.Decision.upsertAction, request, timeout: timeout)
        }
    }

    // MARK: - Running

    /// What one policy did: decisions, conversions drawn, their value, and the values the
    /// truth expected.
    public struct Tally: Sendable {
        public var decisions = 0
        public var conversions = 0
        public var value = 0.0
        public var expectedConversions = 0.0
        public var expectedValue = 0.0

        public var valuePerDecision: Double { decisions > 0 ? value / Double(decisions) : 0 }
        public var expectedValuePerDecision: Double { decisions > 0 ? expectedValue / Double(decisions) : 0 }
        public var expectedRate: Double { decisions > 0 ? expectedConversions / Double(decisions) : 0 }

        mutating func add(rate: Double, value: Double, converted: Bool) {
            decisions += 1
            expectedConversions += rate
            expectedValue += rate * value
            if converted {
                conversions += 1
                self.value += value
            }
        }
    }

    /// The baselines played beside Arbiter on the same persons and draws.
    public static let baselines = ["random", "most_popular", "rules_only", "highest_value"]

    public struct Run: Sendable {
        /// Arbiter as it ran (its holdout included).
        public var arbiter = Tally()
        /// Arbiter outside the global holdout (the learned policy).
        public var treated = Tally()
        /// The global holdout (the default experience).
        public var control = Tally()
        public var baselines: [String: Tally] = [:]
        /// The default experience (rules_only) for every person, by the truth: the control the lift is against.
        public var defaultForAll = Tally()
        /// The best eligible offer for every person, by the truth (no policy can do better).
        public var oracle = Tally()
        public var degraded = 0
        public var noAction = 0
        public var fromMs: Int64 = 0
        public var toMs: Int64 = 0
        /// In the second half, Arbiter's (treated) choices per life stage.
        public var lateChoices: [String: [String: Int]] = [:]
        /// Deliveries by channel (or by suppression reason), with `deliver`.
        public var deliveries: [String: Int] = [:]
        public var deliveryErrors = 0
        /// Decisions by model version prefix (thompson-v1, rules-only).
        public var seconds = 0.0
    }

    /// Decides once for each person in `persons` (`deliver`: every `deliverEvery`-th decision
    /// also goes through routing), `workers` at a time.
    public func run(_ persons: Range<Int>, workers: Int = 8, seed: UInt64 = 1, deliverEvery: Int = 0,
                    progress: @escaping @Sendable (Int) -> Void = { _ in }) async throws -> Run {
        let state = Mutex(Run())
        let popular = Mutex([String: Int]())  // the most-popular baseline's own conversion counts
        let started = ContinuousClock.now
        state.withLock { $0.fromMs = Int64(Date().timeIntervalSince1970 * 1000) - 1 }
        let half = persons.lowerBound + persons.count / 2
        let nonce = String(UInt32.random(in: .min ... .max), radix: 16)  // outcome ids stay new when a run is repeated
        let done = Mutex(0)
        try await LoadTest.forEach(persons.count, workers: workers) { [self] offset in
            let n = persons.lowerBound + offset
            let person = world.persons[n % world.persons.count]
            var random = SplitMix64(seed: seed &+ UInt64(n) &* 0x9E37_79B9_7F4A_7C15)
            let u = random.unit()  // one draw for every policy: common random numbers
            var request = DecisionV1.DecideRequest()
            request.person = ref(person)
            request.placement = placement
            request.context = ["device": person.device]
            request.count = 1
            request.explain = true
            request.deliver = deliverEvery > 0 && n % deliverEvery == 0
            let response = try await decision.call(DecisionV1.Decision.decide, request, timeout: timeout)
            let chosen = response.actions.first?.actionId
            let converted = chosen.map { u < world.truth($0, for: person) } ?? false
            if let chosen, converted {
                var outcome = DecisionV1.ReportOutcomeRequest()
                outcome.outcomeId = "sim-\(nonce)-\(n)"
                outcome.decisionId = response.decisionId
                outcome.actionId = chosen
                outcome.outcome = .conversion
                outcome.value = world.value(chosen)
                _ = try await decision.call(DecisionV1.Decision.reportOutcome, outcome, timeout: timeout)
            }
            let candidates = response.explanations
            let eligible = candidates.filter(\.eligible).map(\.actionId)
            let rulesOnly = DecisionPolicy.rulesOnly.ranking(candidates).first.map { candidates[$0].actionId }
            let highestValue = DecisionPolicy.highestValue.ranking(candidates).first.map { candidates[$0].actionId }
            let randomChoice = eligible.isEmpty ? nil : eligible[random.int(eligible.count)]
            let mostPopular: String? = popular.withLock { counts in
                let best = eligible.map { counts[$0, default: 0] }.max()
                let top = eligible.filter { counts[$0, default: 0] == best }
                return top.isEmpty ? nil : top[random.int(top.count)]
            }
            if let mostPopular, u < world.truth(mostPopular, for: person) { popular.withLock { $0[mostPopular, default: 0] += 1 } }

            state.withLock { run in
                func tally(_ choice: String?) -> (Double, Double, Bool) {
                    guard let choice else { return (0, 0, false) }
                    let rate = world.truth(choice, for: person)
                    return (rate, world.value(choice), u < rate)
                }
                let mine = tally(chosen)
                run.arbiter.add(rate: mine.0, value: mine.1, converted: mine.2)
                if response.holdout {
                    run.control.add(rate: mine.0, value: mine.1, converted: mine.2)
                } else {
                    run.treated.add(rate: mine.0, value: mine.1, converted: mine.2)
                    if n >= half, let chosen { run.lateChoices[person.stage, default: [:]][chosen, default: 0] += 1 }
                }
                for (name, choice) in [("random", randomChoice), ("most_popular", mostPopular), ("rules_only", rulesOnly), ("highest_value", highestValue)] {
                    let t = tally(choice)
                    run.baselines[name, default: Tally()].add(rate: t.0, value: t.1, converted: t.2)
                }
                let d = tally(rulesOnly)
                run.defaultForAll.add(rate: d.0, value: d.1, converted: d.2)
                let o = tally(world.best(for: person, among: eligible))
                run.oracle.add(rate: o.0, value: o.1, converted: o.2)
                if response.degraded { run.degraded += 1 }
                if chosen == nil { run.noAction += 1 }
                if request.deliver, let first = response.actions.first {
                    if let delivery = first.delivery {
                        let key = delivery.state == .suppressed ? "suppressed: \(delivery.suppressionReason)" : delivery.channel.ruleName
                        run.deliveries[key, default: 0] += 1
                    } else if !first.deliveryError.isEmpty {
                        run.deliveryErrors += 1
                    }
                }
            }
            progress(done.withLock { $0 += 1; return $0 })
        }
        return state.withLock { run in
            run.toMs = Int64(Date().timeIntervalSince1970 * 1000) + 1
            run.seconds = (ContinuousClock.now - started) / .seconds(1)
            return run
        }
    }

    // MARK: - What the service measured

    public struct Measured: Sendable {
        public var lift: DecisionV1.LiftReportResponse
        /// EvaluatePolicy's estimate of each baseline it can replay.
        public var estimates: [String: DecisionV1.EvaluatePolicyResponse]
    }

    /// LiftReport and EvaluatePolicy (rules_only, highest_value, logging) over the run's window.
    public func measure(_ run: Run) async throws -> Measured {
        var lift = DecisionV1.LiftReportRequest()
        lift.fromMs = run.fromMs
        lift.toMs = run.toMs
        let report = try await decision.call(DecisionV1.Decision.liftReport, lift, timeout: .seconds(120))
        var estimates: [String: DecisionV1.EvaluatePolicyResponse] = [:]
        for policy in ["rules_only", "highest_value", "logging"] {
            var request = DecisionV1.EvaluatePolicyRequest()
            request.fromMs = run.fromMs
            request.toMs = run.toMs
            request.policy = policy
            estimates[policy] = try await decision.call(DecisionV1.Decision.evaluatePolicy, request, timeout: .seconds(120))
        }
        return Measured(lift: report, estimates: estimates)
    }

    /// The figures as text: cumulative reward against the baselines, lift measured against
    /// the true lift, off-policy estimates against the baselines as run, what was learned.
    public func summary(_ run: Run, _ measured: Measured) -> [String] {
        var lines: [String] = []
        func f(_ x: Double, _ digits: Int = 3) -> String { String(format: "%.\(digits)f", x) }
        lines.append("\(run.arbiter.decisions) decisions in \(f(run.seconds, 1)) s (\(run.treated.decisions) learned, \(run.control.decisions) in the holdout), \(run.degraded) degraded, \(run.noAction) with nothing eligible")
        lines.append("")
        lines.append("cumulative reward (value of conversions; the truth's expectation in brackets):")
        func row(_ name: String, _ t: Tally) -> String {
            name.padding(toLength: 26, withPad: " ", startingAt: 0)
                + String(format: "%9.0f  [%9.0f]  %6.3f per decision  %5d conversions", t.value, t.expectedValue, t.valuePerDecision, t.conversions)
        }
        lines.append(row("arbiter (as run)", run.arbiter))
        lines.append(row("arbiter, learned only", run.treated))
        for name in Self.baselines { lines.append(row(name, run.baselines[name] ?? Tally())) }
        lines.append(row("best possible (oracle)", run.oracle))
        lines.append("")
        let l = measured.lift
        let trueLift = run.treated.expectedRate - run.defaultForAll.expectedRate
        lines.append("lift against the global holdout (conversion rate per person):")
        lines.append("  measured by LiftReport: \(f(l.absoluteLift, 4)) (95 % CI \(f(l.absoluteLiftCi95?.low ?? 0, 4)) to \(f(l.absoluteLiftCi95?.high ?? 0, 4))), relative \(f(l.relativeLift * 100, 1)) %")
        lines.append("  treated \(l.treated?.persons ?? 0) persons at \(f(l.treated?.conversionRate ?? 0, 4)), control \(l.control?.persons ?? 0) at \(f(l.control?.conversionRate ?? 0, 4)); SRM p = \(String(format: "%.3g", l.srmPValue))\(l.srmWarning ? " WARNING" : "")")
        let covered = (l.absoluteLiftCi95?.low ?? 0) <= trueLift && trueLift <= (l.absoluteLiftCi95?.high ?? 0)
        lines.append("  true lift (the truth's rates: learned policy as run vs the default for everyone): \(f(trueLift, 4)) — \(covered ? "inside" : "OUTSIDE") the interval")
        for note in l.notes { lines.append("  note: \(note)") }
        lines.append("")
        lines.append("off-policy estimates from the logged propensities (value per decision):")
        for policy in ["rules_only", "highest_value"] {
            guard let e = measured.estimates[policy], let ran = run.baselines[policy] else { continue }
            let inside = (e.ipsCi95?.low ?? 0) <= ran.valuePerDecision && ran.valuePerDecision <= (e.ipsCi95?.high ?? 0)
            lines.append("  \(policy): IPS \(f(e.ips)) (CI \(f(e.ipsCi95?.low ?? 0)) to \(f(e.ipsCi95?.high ?? 0))), SNIPS \(f(e.snips)), ESS \(Int(e.effectiveSampleSize)); actually run \(f(ran.valuePerDecision)) (truth \(f(ran.expectedValuePerDecision))) — \(inside ? "inside" : "OUTSIDE") the interval")
        }
        if let e = measured.estimates["logging"] {
            lines.append("  logging policy: \(f(e.ips)) per decision on its \(e.decisions) decisions (\(e.excluded) holdout or overridden left out; the learned policy as run: \(f(run.treated.valuePerDecision)))")
        }
        lines.append("")
        lines.append("what the learner found (second half, learned choices per life stage; truth's best in brackets):")
        for stage in World.stages {
            let choices = run.lateChoices[stage] ?? [:]
            let total = choices.values.reduce(0, +)
            let top = choices.sorted { $0.value > $1.value }.prefix(3).map { "\($0.key) \(total > 0 ? Int((Double($0.value) / Double(total) * 100).rounded()) : 0) %" }
            let best = world.offers.map(\.action.id).max { a, b in
                let (pa, pb) = (world.offers.first { $0.action.id == a }!.truth[stage]! * world.value(a), world.offers.first { $0.action.id == b }!.truth[stage]! * world.value(b))
                return pa < pb
            } ?? ""
            lines.append("  \(stage.padding(toLength: 7, withPad: " ", startingAt: 0)) \(top.joined(separator: ", "))  [\(best)]")
        }
        return lines
    }
}
