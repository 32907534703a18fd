import Contracts
@testable import DecisionService
import Foundation
@testable import ProfileService
import RPC
import Rules
import TestSupport
import Testing

/// One decision per person, each converting with its action's hidden rate (the value of a
/// conversion is the action's value). Returns the responses.
func drive(_ decision: DecisionService, persons: Range<Int>, truth: [String: Double], clock: TestClock, seed: UInt64,
           prefix: String = "p", context: [String: String] = [:]) async throws -> [DecisionV1.DecideResponse] {
    var generator = SplitMix64(seed: seed)
    var responses: [DecisionV1.DecideResponse] = []
    for n in persons {
        let response = try await decision.decide(decideRequest("\(prefix)\(n)", context: context))
        if let chosen = response.actions.first, Double.random(in: 0..<1, using: &generator) < truth[chosen.actionId, default: 0] {
            _ = try await decision.outcome("conv-\(prefix)\(n)", response, .conversion)
        }
        responses.append(response)
        clock.advance(seconds: 1)
    }
    return responses
}

func liftRequest(action: String = "", override: String = "", segment: String = "") -> DecisionV1.LiftReportRequest {
    var request = DecisionV1.LiftReportRequest()
    request.actionId = action
    request.overrideId = override
    request.segment = segment
    return request
}

func withLever(_ action: DecisionV1.Action, _ lever: Double) -> DecisionV1.Action {
    var action = action
    action.lever = lever
    return action
}

/// |estimate − truth| in standard errors (the 95 % interval is ±1.96).
func zScore(_ estimate: Double, _ interval: DecisionV1.Interval, truth: Double) -> Double {
    let se = (interval.high - interval.low) / (2 * Statistics.z95)
    return se > 0 ? abs(estimate - truth) / se : (estimate == truth ? 0 : .infinity)
}

@Suite("decision service: holdouts, lift, policy evaluation, overrides")
struct ProofOfValueTests {
    @Test("the global holdout is a stable share of persons, given the default experience, logged on every decision (degraded too), across restarts and merges")
    func holdoutStability() async throws {
        let clock = TestClock()
        let directory = temporaryDirectory("decision-holdout")
        func service() throws -> DecisionService {
            var configuration = DecisionConfiguration()
            configuration.holdout.share = 0.2
            let store = try DecisionStore(directory: directory, configuration: configuration.learner)
            return DecisionService(store: store, configuration: configuration, seed: 3, clock: clock.read)
        }
        var decision: DecisionService? = try service()
        try decision!.upsert(withLever(action("priority"), 2))
        try decision!.upsert(action("b"))
        try decision!.upsert(action("c"))
        var groups: [String: Bool] = [:]
        for n in 0..<1000 {
            let response = try await decision!.decide(decideRequest("p\(n)"))
            groups["p\(n)"] = response.holdout
            if response.holdout {
                // The default experience: rules_only (the highest lever), deterministic.
                #expect(response.actions.map(\.actionId) == ["priority"] && response.actions[0].propensity == 1)
                #expect(response.modelVersion.hasPrefix("rules-only/"))
                #expect(response.explanations.map(\.choiceProbability) == [0, 0, 1])  // sorted by id: b, c, priority
            } else {
                #expect(response.modelVersion.hasPrefix("thompson-v1/"))
            }
            #expect(try decision!.store.decision(response.decisionId)?.holdout == response.holdout)
        }
        let control = groups.values.count { $0 }
        #expect((150...250).contains(control), "\(control) of 1000 in a 20 % holdout")

        // The same persons after a restart: the same groups.
        decision = nil
        decision = try service()
        for n in stride(from: 0, to: 1000, by: 7) {
            #expect(try await decision!.decide(decideRequest("p\(n)")).holdout == groups["p\(n)"])
        }

        // A merge: the survivor keeps its group; the absorbed person's decisions keep what was logged.
        let inControl = groups.first { $0.value }!.key
        let treated = groups.first { !$0.value }!.key
        let before = try await decision!.decide(decideRequest(inControl))
        try decision!.store.apply([(1, .merge(target: treated, sources: [inControl]))], nowMs: clock.read())
        #expect(try await decision!.decide(decideRequest(treated)).holdout == false)
        let moved = try #require(try decision!.store.decision(before.decisionId))
        #expect(moved.personId == treated && moved.holdout)

        // Degraded decisions (no identity service to resolve identifiers) carry their assignment,
        // by identifier, the same each time.
        var degradedControl = 0
        for n in 0..<300 {
            var request = decideRequest("")
            request.person = personRef(identifier("email", "u\(n)@example.com"))
            let first = try await decision!.decide(request)
            let again = try await decision!.decide(request)
            #expect(first.degraded && first.holdout == again.holdout)
            #expect(try decision!.store.decision(first.decisionId)?.holdout == first.holdout)
            if first.holdout { degradedControl += 1 }
        }
        #expect((30...90).contains(degradedControl), "\(degradedControl) of 300")
    }

    @Test("LiftReport measures the learned policy against the holdout with intervals, filters by segment, and flags a broken split")
    func liftAndSRM() async throws {
        let clock = TestClock()
        try await withProfile(clock: clock) { profile, client in
            let decision = try makeDecision(clock: clock, profile: client, seed: 11) { $0.holdout.share = 0.2 }
            // The control's default (highest lever) is the weak action; the learner can find the strong one.
            try decision.upsert(withLever(action("weak", value: 10), 2))
            try decision.upsert(action("strong", value: 10))
            try profile.store.defineSegment(name: "gold", rule: try Rule("trait.tier == \"gold\""), nowMs: clock.read())
            for n in 0..<3000 where n % 3 == 0 { try seed(profile.store, "p\(n)", traits: [("tier", .string("gold"))], at: clock.read()) }
            let responses = try await drive(decision, persons: 0..<3000, truth: ["weak": 0.05, "strong": 0.30], clock: clock, seed: 5)

            let report = try decision.liftReport(liftRequest())
            let controlPersons = responses.count { $0.holdout }
            #expect(report.control!.persons == UInt64(controlPersons) && report.treated!.persons == UInt64(3000 - controlPersons))
            #expect(report.comparison.hasPrefix("global holdout"))
            #expect(abs(report.control!.conversionRate - 0.05) < 0.03, "\(report.control)")
            #expect(report.absoluteLift > 0.1 && report.absoluteLiftCi95!.low > 0, "\(report)")
            #expect(report.relativeLift > 1 && report.relativeLiftCi95!.low > 0)
            #expect(report.valueLift > 1 && report.valueLiftCi95!.low > 0)
            #expect(abs(report.treated!.valuePerPerson - 10 * report.treated!.conversionRate) < 1e-9)
            #expect(report.srmPValue > 0.001 && !report.srmWarning, "\(report)")

            // EvaluatePolicy weighs only the learned policy's decisions: the holdout's are left out.
            var logging = DecisionV1.EvaluatePolicyRequest()
            logging.policy = "logging"
            let evaluated = try decision.evaluatePolicy(logging)
            #expect(evaluated.excluded == UInt64(controlPersons) && evaluated.decisions == UInt64(3000 - controlPersons))

            // Only the gold segment's decisions (every third person).
            let gold = try decision.liftReport(liftRequest(segment: "gold"))
            #expect(gold.treated!.persons + gold.control!.persons == 1000)
            #expect(gold.control!.persons == UInt64(responses.enumerated().count { $0.offset % 3 == 0 && $0.element.holdout }))

            // The same log read by a service whose configured share no longer matches it: a broken split.
            var changed = decision.configuration
            changed.holdout.share = 0.05
            let broken = DecisionService(store: decision.store, configuration: changed, clock: clock.read)
            let flagged = try broken.liftReport(liftRequest())
            #expect(flagged.srmWarning && flagged.srmPValue < 1e-6, "\(flagged)")
            #expect(flagged.notes.contains { $0.hasPrefix("sample-ratio mismatch") })

            // A window with no decisions has nothing to compare; bad requests name their field.
            var empty = liftRequest()
            empty.fromMs = clock.read() + 1000
            empty.toMs = clock.read() + 2000
            let nothing = try decision.liftReport(empty)
            #expect(nothing.treated!.persons == 0 && !nothing.notes.isEmpty)
            var backwards = liftRequest()
            backwards.fromMs = 10
            backwards.toMs = 5
            await expectInvalid("to_ms") { _ = try decision.liftReport(backwards) }
            await expectInvalid("segment") { _ = try decision.liftReport(liftRequest(segment: "bad segment")) }
            await expectInvalid("override_id") { _ = try decision.liftReport(liftRequest(action: "weak", override: "o1")) }
            await expectCode(.notFound) { _ = try decision.liftReport(liftRequest(action: "missing")) }
            await expectInvalid("override_id") { _ = try decision.liftReport(liftRequest(override: "no such override")) }
            await expectCode(.notFound) { _ = try decision.liftReport(liftRequest(override: "o-missing")) }
        }
    }

    @Test("sample-ratio mismatch: a fair split passes, a deliberately broken one is flagged below p = 0.001")
    func srmStatistics() {
        #expect(Statistics.srmPValue(treated: 9_000, control: 1_000, expectedControlShare: 0.1) > 0.99)
        #expect(Statistics.srmPValue(treated: 9_100, control: 900, expectedControlShare: 0.1) < 0.001)  // 10 % short: z ≈ 3.3
        var generator = SplitMix64(seed: 99)
        var flagged = 0
        for _ in 0..<1000 {
            let control = (0..<2000).count { _ in Double.random(in: 0..<1, using: &generator) < 0.1 }
            if Statistics.srmPValue(treated: 2000 - control, control: control, expectedControlShare: 0.1) < 0.001 { flagged += 1 }
        }
        #expect(flagged <= 5, "a fair split flagged \(flagged) times in 1000")
    }

    @Test("the lift intervals cover a known effect in about 95 % of seeded runs")
    func intervalCoverage() {
        var generator = SplitMix64(seed: 2026)
        let (p0, p1, n) = (0.10, 0.13, 1500)
        var covered = (absolute: 0, relative: 0, value: 0)
        let runs = 400
        for _ in 0..<runs {
            let treated = (0..<n).map { _ in Double.random(in: 0..<1, using: &generator) < p1 }
            let control = (0..<n).map { _ in Double.random(in: 0..<1, using: &generator) < p0 }
            let c = Statistics.proportions(x1: treated.count { $0 }, n1: n, x0: control.count { $0 }, n0: n)!
            if c.absoluteCI.0 <= p1 - p0, p1 - p0 <= c.absoluteCI.1 { covered.absolute += 1 }
            if let ci = c.relativeCI, ci.0 <= p1 / p0 - 1, p1 / p0 - 1 <= ci.1 { covered.relative += 1 }
            // Value per person: a conversion is worth 20 (treated) or 25 (control) on average, exponentially spread.
            let tv = treated.map { $0 ? -20 * log(1 - Double.random(in: 0..<1, using: &generator)) : 0 }
            let cv = control.map { $0 ? -25 * log(1 - Double.random(in: 0..<1, using: &generator)) : 0 }
            let v = Statistics.means(tv, cv)!
            if v.ci.0 <= 20 * p1 - 25 * p0, 20 * p1 - 25 * p0 <= v.ci.1 { covered.value += 1 }
        }
        for (name, count) in [("absolute", covered.absolute), ("relative", covered.relative), ("value", covered.value)] {
            let share = Double(count) / Double(runs)
            #expect((0.92...0.98).contains(share), "\(name) lift interval covered the truth in \(share) of runs")
        }

        // Small sides (8 persons each, unequal spread): Welch's t interval keeps its coverage,
        // where a normal-quantile interval covers only about 90 %.
        func normal() -> Double {
            (-2 * log(1 - Double.random(in: 0..<1, using: &generator))).squareRoot() * cos(2 * .pi * Double.random(in: 0..<1, using: &generator))
        }
        let smallRuns = 2000
        var smallCovered = 0
        for _ in 0..<smallRuns {
            let v = Statistics.means((0..<8).map { _ in 5 + 2 * normal() }, (0..<8).map { _ in 3 + 4 * normal() })!
            if v.ci.0 <= 2, 2 <= v.ci.1 { smallCovered += 1 }
        }
        #expect((0.935...0.965).contains(Double(smallCovered) / Double(smallRuns)), "small sides: \(smallCovered) of \(smallRuns)")
        // A side without a single conversion still gets an interval with a width.
        let none = Statistics.proportions(x1: 0, n1: 40, x0: 0, n0: 40)!
        #expect(none.absolute == 0 && none.absoluteCI.0 < -0.05 && none.absoluteCI.1 > 0.05)
    }

    @Test("EvaluatePolicy: IPS of the logging policy and of other policies lands on their true value within the interval")
    func policyEvaluation() async throws {
        let clock = TestClock()
        let decision = try makeDecision(clock: clock, seed: 21) { $0.learner.explorationFloor = 0.3 }
        let truth = ["a": 0.04, "b": 0.12, "c": 0.08, "d": 0.02]
        try decision.upsert(action("a", value: 10))
        try decision.upsert(action("b", value: 10))
        try decision.upsert(action("c", value: 10))
        try decision.upsert(withLever(action("d", value: 10), 3))
        let responses = try await drive(decision, persons: 0..<6000, truth: truth, clock: clock, seed: 8)

        func evaluate(_ policy: String) throws -> DecisionV1.EvaluatePolicyResponse {
            var request = DecisionV1.EvaluatePolicyRequest()
            request.policy = policy
            return try decision.evaluatePolicy(request)
        }
        // The logging policy: its expected value per decision from the logged choice probabilities.
        let expected = responses.reduce(0.0) { sum, r in
            sum + r.explanations.reduce(0) { $0 + $1.choiceProbability * truth[$1.actionId]! * 10 }
        } / Double(responses.count)
        let logging = try evaluate("logging")
        #expect(logging.decisions == 6000 && logging.matched == 6000)
        #expect(abs(logging.ips - logging.loggedValue) < 1e-12 && logging.effectiveSampleSize == 6000)
        #expect(zScore(logging.ips, logging.ipsCi95!, truth: expected) < 3.29, "logging: \(logging.ips) vs \(expected)")

        // Deterministic targets: their true value is known from the hidden rates.
        let noExploration = responses.reduce(0.0) { sum, r in
            sum + truth[r.explanations.max { ($0.score, $1.actionId) < ($1.score, $0.actionId) }!.actionId]! * 10
        } / Double(responses.count)
        for (policy, value) in [("always:b", 1.2), ("always:d", 0.2), ("rules_only", 0.2), ("highest_value", 0.2), ("no_exploration", noExploration)] {
            let estimate = try evaluate(policy)
            #expect(estimate.decisions == 6000 && estimate.matched > 0 && estimate.matched < 6000)
            #expect(estimate.effectiveSampleSize > 100 && estimate.effectiveSampleSize < 6000)
            #expect(zScore(estimate.ips, estimate.ipsCi95!, truth: value) < 3.29, "\(policy): IPS \(estimate.ips) \(estimate.ipsCi95) vs \(value)")
            #expect(zScore(estimate.snips, estimate.snipsCi95!, truth: value) < 3.29, "\(policy): SNIPS \(estimate.snips) vs \(value)")
            #expect(estimate.notes.isEmpty, "\(estimate.notes)")
        }
        // The learner found b: the logged policy beats the rules-only baseline.
        let rulesOnly = try evaluate("rules_only")
        #expect(logging.loggedValue > rulesOnly.ipsCi95!.high)

        await expectInvalid("policy") { _ = try evaluate("best") }
        await expectInvalid("policy") { _ = try evaluate("always:") }
        await expectInvalid("policy") { _ = try evaluate("always:" + String(repeating: "x", count: 100)) }
        await expectCode(.notFound, message: "no action \"nope\"") { _ = try evaluate("always:nope") }  // not a confident 0

        // Nothing earned, or nothing to evaluate: said, not an interval of no width alone.
        let quiet = try makeDecision(clock: clock, seed: 3)
        try quiet.upsert(action("a"))
        try quiet.upsert(action("b"))
        for n in 0..<20 { _ = try await quiet.decide(decideRequest("z\(n)")) }
        var request = DecisionV1.EvaluatePolicyRequest()
        request.policy = "always:a"
        let nothing = try quiet.evaluatePolicy(request)
        #expect(nothing.ips == 0 && nothing.ipsCi95?.high == 0 && nothing.notes.contains { $0.hasPrefix("no reward observed") }, "\(nothing)")
        request.fromMs = 1
        request.toMs = 2
        #expect(try quiet.evaluatePolicy(request).notes == ["no decision in this window to evaluate"])
    }

    @Test("an override decides for the persons it covers, its control share keeps the algorithm, and LiftReport shows its cost")
    func overrideCost() async throws {
        let clock = TestClock()
        let directory = temporaryDirectory("decision-override")
        var configuration = DecisionConfiguration()
        configuration.holdout.share = 0
        configuration.holdout.overrideControlShare = 0.3
        let decision = DecisionService(store: try DecisionStore(directory: directory), configuration: configuration, seed: 4, clock: clock.read)
        try decision.upsert(action("good", value: 10))
        try decision.upsert(action("bad", value: 10))
        let truth = ["good": 0.3, "bad": 0.03]
        _ = try await drive(decision, persons: 0..<1500, truth: truth, clock: clock, seed: 1, prefix: "warm")

        // Validation names the field.
        await expectInvalid("override.kind") { _ = try decision.store.setOverride(override("boost", "bad"), nowMs: clock.read()) }
        var noReason = override("force", "bad")
        noReason.reason = " "
        await expectInvalid("override.reason") { _ = try decision.store.setOverride(noReason, nowMs: clock.read()) }
        var noAuthor = override("force", "bad")
        noAuthor.author = ""
        await expectInvalid("override.author") { _ = try decision.store.setOverride(noAuthor, nowMs: clock.read()) }
        await expectInvalid("override.expires_at_ms") { _ = try decision.store.setOverride(override("force", "bad", expires: 5), nowMs: clock.read()) }
        await expectCode(.notFound) { _ = try decision.store.setOverride(override("force", "nope"), nowMs: clock.read()) }

        let force = try decision.store.setOverride(override("force", "bad", context: ["campaign": "spring"]), nowMs: clock.read())
        #expect(force.active && force.version == 1 && force.id.hasPrefix("o"))
        let covered = try await drive(decision, persons: 0..<3000, truth: truth, clock: clock, seed: 2, context: ["campaign": "spring"])
        for response in covered {
            let effect = try #require(response.overrides.first)
            #expect(effect.overrideId == force.id)
            if effect.applied { #expect(response.actions[0].actionId == "bad" && response.actions[0].propensity == 1) }
        }
        // Requests outside the override's context are not touched.
        #expect(try await decision.decide(decideRequest("other", context: ["campaign": "autumn"])).overrides.isEmpty)

        let report = try decision.liftReport(liftRequest(override: force.id))
        #expect(report.treated!.persons + report.control!.persons == 3000)
        #expect(abs(Double(report.control!.persons) / 3000 - 0.3) < 0.04, "\(report)")
        #expect(!report.srmWarning)
        // Forcing the bad action costs conversions: the lift is negative and its interval excludes 0.
        #expect(report.absoluteLift < -0.15 && report.absoluteLiftCi95!.high < 0, "\(report)")
        #expect(report.valueLift < 0 && report.valueLiftCi95!.high < 0)

        // A change and an end, each audited; an ended override decides nothing.
        var changed = force
        changed.reason = "spring campaign, extended"
        changed.author = "bo"
        #expect(try decision.store.setOverride(changed, nowMs: clock.read()).version == 2)
        // What it does and to whom is fixed (before, a force of bad could become a ban of good
        // under the same id, and LiftReport pooled the two).
        var redefined = changed
        redefined.kind = "ban"
        redefined.actionId = "good"
        await expectInvalid("override.kind") { _ = try decision.store.setOverride(redefined, nowMs: clock.read()) }
        redefined = changed
        redefined.context = ["campaign": "autumn"]
        await expectInvalid("override.context") { _ = try decision.store.setOverride(redefined, nowMs: clock.read()) }
        await expectInvalid("author") { _ = try decision.store.endOverride(force.id, author: "", reason: "", nowMs: clock.read()) }
        await expectInvalid("id") { _ = try decision.store.endOverride(String(repeating: "o", count: 200), author: "cy", reason: "", nowMs: clock.read()) }
        var unnamed = changed
        unnamed.id = "o 1"
        await expectInvalid("override.id") { _ = try decision.store.setOverride(unnamed, nowMs: clock.read()) }
        let ended = try decision.store.endOverride(force.id, author: "cy", reason: "campaign over", nowMs: clock.read())
        #expect(!ended.active && ended.endedBy == "cy")
        #expect(try await decision.decide(decideRequest("p1", context: ["campaign": "spring"])).overrides.isEmpty)
        await expectCode(.failedPrecondition) { _ = try decision.store.setOverride(changed, nowMs: clock.read()) }

        // A ban with an expiry: excluded (and explained) until it expires; its control share still sees the action.
        let ban = try decision.store.setOverride(override("ban", "good", expires: clock.read() + 60_000), nowMs: clock.read())
        var bannedFor = 0
        for n in 0..<200 {
            let response = try await decision.decide(decideRequest("q\(n)"))
            let good = response.explanations.first { $0.actionId == "good" }!
            #expect(response.overrides.map(\.overrideId) == [ban.id])
            if response.overrides[0].applied {
                bannedFor += 1
                #expect(!good.eligible && good.excludedBy == "override: banned by \(ban.id) (spring campaign)")
                #expect(response.actions.map(\.actionId) == ["bad"])
            } else {
                #expect(good.eligible)
            }
        }
        #expect((110...170).contains(bannedFor))
        clock.advance(seconds: 61)
        #expect(try await decision.decide(decideRequest("q1")).overrides.isEmpty)

        // Listing, history and persistence across a restart.
        let reopened = DecisionService(store: try DecisionStore(directory: directory), configuration: configuration, clock: clock.read)
        var list = DecisionV1.ListOverridesRequest()
        #expect(try reopened.listOverrides(list).overrides.isEmpty)  // none applies now
        list.includeEnded = true
        list.includeHistory = true
        let listed = try reopened.listOverrides(list)
        #expect(listed.overrides.map(\.id) == [force.id, ban.id] && listed.overrides.allSatisfy { !$0.active })
        #expect(!listed.historyTruncated && !listed.endedTruncated)
        // Those that stopped applying are bounded too: the one that stopped most recently (the
        // ban expired after the force ended) is kept.
        list.endedLimit = 1
        let recent = try reopened.listOverrides(list)
        #expect(recent.overrides.map(\.id) == [ban.id] && recent.endedTruncated)
        list.endedLimit = 10_001
        await expectInvalid("ended_limit") { _ = try reopened.listOverrides(list) }
        list.endedLimit = 0
        let history = listed.history
        #expect(history.map { "\($0.change) by \($0.author)" } == ["created by ana", "changed by bo", "ended by cy", "created by ana"])
        #expect(history[2].reason == "campaign over" && history[1].override?.reason == "spring campaign, extended")
        // The history is bounded: the newest changes (still oldest first), of one override or all.
        list.historyLimit = 2
        let newest = try reopened.listOverrides(list)
        #expect(newest.history.map(\.change) == ["ended", "created"] && newest.historyTruncated)
        list.historyOverrideId = force.id
        list.historyLimit = 0
        let one = try reopened.listOverrides(list)
        #expect(one.history.map(\.change) == ["created", "changed", "ended"] && !one.historyTruncated)
        list.historyLimit = 10_001
        await expectInvalid("history_limit") { _ = try reopened.listOverrides(list) }
        list.historyLimit = 0
        list.historyOverrideId = "not a name"
        await expectInvalid("history_override_id") { _ = try reopened.listOverrides(list) }
    }

    @Test("concurrent changes of one override each get their own version (none fails on the audit key)")
    func concurrentOverrideChanges() async throws {
        let clock = TestClock()
        let decision = try makeDecision(clock: clock, seed: 5)
        try decision.upsert(action("a", value: 10))
        var o = DecisionV1.Override()
        o.kind = "ban"
        o.actionId = "a"
        o.reason = "first"
        o.author = "ana"
        let first = try decision.store.setOverride(o, nowMs: clock.read())
        let store = decision.store
        let now = clock.read()
        let versions = try await withThrowingTaskGroup(of: UInt64.self) { group in
            for n in 0..<16 {
                var change = first
                change.reason = "change \(n)"
                group.addTask { try store.setOverride(change, nowMs: now).version }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(Set(versions) == Set(2...17))
        #expect(try decision.store.overrideHistory(of: first.id).changes.count == 17)
    }

    /// A decision service with `welcome` (at most one offer a week, held out for half of the
    /// persons, ranked first by its lever) and `other`, and the first decision that offered
    /// `welcome`.
    func cappedWelcome(_ clock: TestClock) async throws -> (DecisionService, DecisionV1.DecideResponse) {
        let decision = try makeDecision(clock: clock, seed: 5)
        var welcome = withLever(action("welcome", value: 10, caps: [cap(.action, 1, per: 7 * 86_400)]), 100)
        welcome.holdoutShare = 0.5
        try decision.upsert(welcome)
        try decision.upsert(action("other", value: 1))
        var treated: DecisionV1.DecideResponse?
        for n in 0..<200 where treated == nil {
            let response = try await decision.decide(decideRequest("t\(n)"))
            if response.actions.first?.actionId == "welcome" { treated = response }
        }
        return (decision, try #require(treated))
    }

    @Test("LiftReport counts every decision of a person from their first in scope: a cap the treatment used up does not drop the treated side's later conversions")
    func liftAfterCap() async throws {
        let clock = TestClock()
        let (decision, first) = try await cappedWelcome(clock)
        // Its next decision, a minute later (ids order decisions to the millisecond): welcome is
        // capped (out of scope on its own), and the person converts.
        clock.advance(seconds: 60)
        let next = try await decision.decide(decideRequest(first.personId))
        #expect(next.actions.map(\.actionId) == ["other"])
        _ = try await decision.outcome("converted", next, .conversion)
        let report = try decision.liftReport(liftRequest(action: "welcome"))
        // Before, 0: the decision with the conversion was dropped for the cap the treatment used.
        #expect(report.treated!.convertedPersons == 1 && report.treated!.decisions >= 2, "\(report)")
    }

    @Test("LiftReport over a later window: a treated person whose action the treatment capped is in scope, on their side")
    func liftLaterWindowAfterCap() async throws {
        let clock = TestClock()
        let (decision, first) = try await cappedWelcome(clock)
        clock.advance(seconds: 60)
        let windowStart = clock.read()
        let next = try await decision.decide(decideRequest(first.personId))  // welcome capped
        #expect(next.actions.map(\.actionId) == ["other"])
        _ = try await decision.outcome("converted", next, .conversion)
        // The person also buys welcome unprompted, reported on this decision (welcome capped
        // in it): taken, as a held-out person's would be (before, INVALID_ARGUMENT).
        _ = try await decision.outcome("bought-welcome", next, .conversion, action: "welcome")
        await expectInvalid("action_id") { _ = try await decision.outcome("clicked-welcome", next, .click, action: "welcome") }
        var request = liftRequest(action: "welcome")
        request.fromMs = windowStart
        let report = try decision.liftReport(request)
        // Before: no one (the capped decision was out of scope, and the person never entered),
        // while a held-out person's decision in the same window would have entered as control.
        #expect(report.treated!.persons == 1 && report.treated!.convertedPersons == 1 && report.control!.persons == 0, "\(report)")
    }

    @Test("a conversion on an action the decision found eligible but did not offer is taken and teaches nothing; a click on it is refused")
    func conversionOnEligibleNotOffered() async throws {
        let clock = TestClock()
        let decision = try makeDecision(clock: clock)
        try decision.upsert(action("a"))
        try decision.upsert(action("b"))
        let response = try await decision.decide(decideRequest("p1", count: 1))
        let other = response.actions[0].actionId == "a" ? "b" : "a"
        let keys: [ArmKey] = [.global(other), .placement(other, "home")]
        let before = decision.store.arms(keys, nowMs: clock.read())
        // Before: INVALID_ARGUMENT, so a treated person's unprompted purchase went uncounted
        // while a held-out person's was counted as control.
        #expect(try await decision.outcome("bought", response, .conversion, action: other).duplicate == false)
        await expectInvalid("action_id") { _ = try await decision.outcome("clicked", response, .click, action: other) }
        #expect(decision.store.arms(keys, nowMs: clock.read()) == before)
        #expect(try decision.liftReport(liftRequest()).treated!.convertedPersons == 1)
    }

    @Test("EvaluatePolicy keeps the decisions a ban applied to (the draw among the rest is logged) and leaves out those a force decided")
    func evaluateWithBan() async throws {
        let clock = TestClock()
        let decision = try makeDecision(clock: clock)
        for id in ["a", "b", "c"] { try decision.upsert(action(id)) }
        let ban = try decision.store.setOverride(override("ban", "a"), nowMs: clock.read())
        for n in 0..<60 { _ = try await decision.decide(decideRequest("p\(n)")) }
        var request = DecisionV1.EvaluatePolicyRequest()
        request.policy = "logging"
        var evaluated = try decision.evaluatePolicy(request)
        // Before, every decision the ban applied to (about 90 %) was left out as certain.
        #expect(evaluated.excluded == 0 && evaluated.decisions == 60, "\(evaluated)")
        _ = try decision.store.endOverride(ban.id, author: "cy", reason: "done", nowMs: clock.read())
        clock.advance(seconds: 1)
        _ = try decision.store.setOverride(override("force", "b"), nowMs: clock.read())
        for n in 60..<120 { _ = try await decision.decide(decideRequest("p\(n)")) }
        evaluated = try decision.evaluatePolicy(request)
        #expect(evaluated.excluded > 30 && evaluated.excluded < 60 && evaluated.decisions + evaluated.excluded == 120, "\(evaluated)")
    }

    @Test("a report stops at its caller's deadline, with DEADLINE_EXCEEDED naming the window")
    func reportDeadline() async throws {
        let decision = try makeDecision()
        try decision.upsert(action("a"))
        for n in 0..<20 { _ = try await decision.decide(decideRequest("p\(n)")) }
        let passed = ContinuousClock.now - .seconds(1)
        await expectCode(.deadlineExceeded) {
            _ = try await RPCDeadline.$current.withValue(passed) {
                try await decision.report { try decision.liftReport(liftRequest(), limit: $0) }
            }
        }
        var evaluate = DecisionV1.EvaluatePolicyRequest()
        evaluate.policy = "logging"
        await expectCode(.deadlineExceeded) { _ = try decision.evaluatePolicy(evaluate, limit: ReportLimit(deadline: passed)) }
        // A caller gone: stopped, CANCELLED.
        let gone = ReportLimit(deadline: nil)
        gone.cancel()
        await expectCode(.cancelled) { _ = try decision.liftReport(liftRequest(), limit: gone) }
        // Within its deadline it answers.
        let report = try await RPCDeadline.$current.withValue(ContinuousClock.now + .seconds(60)) {
            try await decision.report { try decision.liftReport(liftRequest(), limit: $0) }
        }
        #expect(report.treated!.decisions == 20)
    }

    @Test("EndOverride needs a reason; ending one that already expired keeps the time it stopped")
    func endExpiredOverride() async throws {
        let clock = TestClock()
        let decision = try makeDecision(clock: clock)
        try decision.upsert(action("good"))
        let ban = try decision.store.setOverride(override("ban", "good", expires: clock.read() + 60_000), nowMs: clock.read())
        // Before, an empty reason was taken: an audit entry saying nothing of why.
        await expectInvalid("reason") { _ = try decision.store.endOverride(ban.id, author: "cy", reason: " ", nowMs: clock.read()) }
        clock.advance(seconds: 3600)
        // Before, it "stopped" an hour after it had stopped applying.
        let ended = try decision.store.endOverride(ban.id, author: "cy", reason: "tidy up", nowMs: clock.read())
        #expect(ended.endedAtMs == ban.expiresAtMs && ended.endedBy == "cy" && !ended.active)
    }

    @Test("a per-action holdout withholds the action from its share of persons, and LiftReport measures what the action adds")
    func actionHoldout() async throws {
        let clock = TestClock()
        let decision = try makeDecision(clock: clock, seed: 9)
        var held = action("upsell", value: 10)
        held.holdoutShare = 0.3
        try decision.upsert(held)
        try decision.upsert(action("plain", value: 10))
        var invalid = action("x")
        invalid.holdoutShare = 0.7
        await expectInvalid("action.holdout_share") { try decision.upsert(invalid) }

        let responses = try await drive(decision, persons: 0..<2000, truth: ["upsell": 0.25, "plain": 0.05], clock: clock, seed: 3)
        let heldOut = responses.filter { $0.heldOutActions == ["upsell"] }
        #expect(abs(Double(heldOut.count) / 2000 - 0.3) < 0.04)
        for response in heldOut {
            #expect(response.actions.allSatisfy { $0.actionId != "upsell" })
            #expect(response.explanations.first { $0.actionId == "upsell" }?.excludedBy.hasPrefix("holdout:") == true)
        }
        let report = try decision.liftReport(liftRequest(action: "upsell"))
        #expect(report.control!.persons == UInt64(heldOut.count) && report.treated!.persons == UInt64(2000 - heldOut.count))
        #expect(report.expectedControlShare == 0.3 && !report.srmWarning)
        #expect(report.absoluteLift > 0.05 && report.absoluteLiftCi95!.low > 0, "\(report)")

        // A held-out person who buys the upsell anyway: the conversion is reported on the action
        // held out (before, refused: "did not offer"), counts for the control side, and teaches
        // nothing.
        var control: DecisionV1.DecideResponse?
        var tried = 0
        for n in 0..<100 where control == nil {
            tried += 1
            let response = try await decision.decide(decideRequest("anyway-\(n)"))
            if response.heldOutActions == ["upsell"] { control = response }
        }
        let withheld = try #require(control)
        let arms = decision.store.memory.withLock { $0.arms }
        _ = try await decision.outcome("anyway", withheld, .conversion, action: "upsell")
        #expect(decision.store.memory.withLock { $0.arms } == arms)
        let after = try decision.liftReport(liftRequest(action: "upsell"))
        #expect(after.control!.convertedPersons == report.control!.convertedPersons + 1)
        await #expect(throws: RPCError.self) { _ = try await decision.outcome("never", withheld, .conversion, action: "nothing-like-it") }

        // A ban on the action counts its persons as treated (intent to treat): the split stays
        // as drawn, with no sample-ratio warning, where dropping them would leave mostly control.
        var ban = DecisionV1.Override()
        ban.kind = "ban"
        ban.actionId = "upsell"
        ban.reason = "complaints"
        ban.author = "ana"
        _ = try decision.store.setOverride(ban, nowMs: clock.read())
        let banned = try await drive(decision, persons: 2000..<2400, truth: ["upsell": 0.25, "plain": 0.05], clock: clock, seed: 4)
        #expect(banned.count { $0.explanations.contains { $0.excludedBy.hasPrefix("override: banned by") } } > 200)
        let withBan = try decision.liftReport(liftRequest(action: "upsell"))
        #expect(withBan.control!.persons + withBan.treated!.persons == UInt64(2400 + tried))
        #expect(!withBan.srmWarning, "\(withBan)")

        // Without a holdout there is nothing to compare with, and the report says so.
        let plain = try decision.liftReport(liftRequest(action: "plain"))
        #expect(plain.control!.persons == 0 && plain.notes.contains { $0.contains("no holdout") })
    }
}
