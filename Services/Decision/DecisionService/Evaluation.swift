import Contracts
import Foundation
import GRDB
import RPC
import Rules
import Storage
import Synchronization

/// Normal-approximation statistics for lift and off-policy estimates.
enum Statistics {
    static let z95 = 1.959963984540054

    struct Comparison: Equatable {
        var absolute: Double
        var absoluteCI: (Double, Double)
        /// nil when a side has no conversions (the ratio has no interval).
        var relative: Double?
        var relativeCI: (Double, Double)?

        static func == (a: Self, b: Self) -> Bool {
            a.absolute == b.absolute && a.absoluteCI == b.absoluteCI && a.relative == b.relative
                && a.relativeCI.map { [$0.0, $0.1] } == b.relativeCI.map { [$0.0, $0.1] }
        }
    }

    /// Two proportions, `x1/n1` (treated) against `x0/n0` (control): the difference with
    /// the Agresti–Caffo interval (Wald's after one success and one failure are added to
    /// each side, so a side at 0 % or 100 % still has a width), and the ratio minus one with
    /// a delta-method interval on its log.
    static func proportions(x1: Int, n1: Int, x0: Int, n0: Int) -> Comparison? {
        guard n1 > 0, n0 > 0 else { return nil }
        let (p1, p0) = (Double(x1) / Double(n1), Double(x0) / Double(n0))
        let (a1, a0) = (Double(x1 + 1) / Double(n1 + 2), Double(x0 + 1) / Double(n0 + 2))
        let se = (a1 * (1 - a1) / Double(n1 + 2) + a0 * (1 - a0) / Double(n0 + 2)).squareRoot()
        var c = Comparison(absolute: p1 - p0, absoluteCI: (a1 - a0 - z95 * se, a1 - a0 + z95 * se))
        if x1 > 0, x0 > 0 {
            let log = Foundation.log(p1 / p0)
            let seLog = ((1 - p1) / Double(x1) + (1 - p0) / Double(x0)).squareRoot()
            c.relative = p1 / p0 - 1
            c.relativeCI = (exp(log - z95 * seLog) - 1, exp(log + z95 * seLog) - 1)
        }
        return c
    }

    /// The difference of two means with Welch's interval (Student's t with the
    /// Welch–Satterthwaite degrees of freedom: wider than the normal one on small sides).
    static func means(_ treated: [Double], _ control: [Double]) -> (difference: Double, ci: (Double, Double))? {
        guard treated.count > 1, control.count > 1 else { return nil }
        let (m1, v1) = meanVariance(treated)
        let (m0, v0) = meanVariance(control)
        let (q1, q0) = (v1 / Double(treated.count), v0 / Double(control.count))
        let se = (q1 + q0).squareRoot()
        let denominator = q1 * q1 / Double(treated.count - 1) + q0 * q0 / Double(control.count - 1)
        let t = denominator > 0 ? t975(degreesOfFreedom: (q1 + q0) * (q1 + q0) / denominator) : z95
        return (m1 - m0, (m1 - m0 - t * se, m1 - m0 + t * se))
    }

    /// The 97.5 % quantile of Student's t with `ν` degrees of freedom: below 5, the exact
    /// value at ν rounded down (wider, never narrower); from 5 on, the Cornish–Fisher expansion
    /// around the normal quantile (0.003 short at 5, under 0.0002 from 10).
    static func t975(degreesOfFreedom ν: Double) -> Double {
        if ν < 2 { return 12.706204736174705 }
        if ν < 3 { return 4.302652729749464 }
        if ν < 4 { return 3.182446305284263 }
        if ν < 5 { return 2.7764451051977934 }
        let z = z95
        let (z3, z5, z7) = (z * z * z, z * z * z * z * z, z * z * z * z * z * z * z)
        return z + (z3 + z) / (4 * ν) + (5 * z5 + 16 * z3 + 3 * z) / (96 * ν * ν)
            + (3 * z7 + 19 * z5 + 17 * z3 - 15 * z) / (384 * ν * ν * ν)
    }

    /// Mean and sample variance.
    static func meanVariance(_ xs: [Double]) -> (mean: Double, variance: Double) {
        guard !xs.isEmpty else { return (0, 0) }
        let mean = xs.reduce(0, +) / Double(xs.count)
        guard xs.count > 1 else { return (mean, 0) }
        return (mean, xs.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(xs.count - 1))
    }

    /// Sample-ratio mismatch: the p-value of a chi-square test (1 degree of freedom) of
    /// `control` persons out of `control + treated` against the expected control share.
    static func srmPValue(treated: Int, control: Int, expectedControlShare share: Double) -> Double {
        let n = Double(treated + control)
        guard n > 0, share > 0, share < 1 else { return 1 }
        let (e0, e1) = (n * share, n * (1 - share))
        let chi2 = (Double(control) - e0) * (Double(control) - e0) / e0 + (Double(treated) - e1) * (Double(treated) - e1) / e1
        return erfc((chi2 / 2).squareRoot())
    }

    struct OffPolicy {
        var ips: Double
        var ipsCI: (Double, Double)
        /// nil when no weight is positive (the target agrees with no logged decision): 0/0.
        var snips: Double?
        var snipsCI: (Double, Double)?
        var effectiveSampleSize: Double
    }

    /// IPS and self-normalized IPS from importance weights `w` (target probability over
    /// logged propensity) and rewards `r`, with normal intervals and the effective sample size.
    static func offPolicy(weights w: [Double], rewards r: [Double]) -> OffPolicy? {
        guard !w.isEmpty, w.count == r.count else { return nil }
        let n = Double(w.count)
        let products = zip(w, r).map { $0 * $1 }
        let (ips, variance) = meanVariance(products)
        let seIPS = (variance / n).squareRoot()
        let sumW = w.reduce(0, +)
        let sumW2 = w.reduce(0) { $0 + $1 * $1 }
        guard sumW > 0 else {
            return OffPolicy(ips: ips, ipsCI: (ips - z95 * seIPS, ips + z95 * seIPS), snips: nil, snipsCI: nil, effectiveSampleSize: 0)
        }
        let snips = products.reduce(0, +) / sumW
        let residual = zip(w, r).reduce(0) { $0 + $1.0 * $1.0 * ($1.1 - snips) * ($1.1 - snips) }
        let seSNIPS = residual.squareRoot() / sumW
        return OffPolicy(ips: ips, ipsCI: (ips - z95 * seIPS, ips + z95 * seIPS),
                         snips: snips, snipsCI: (snips - z95 * seSNIPS, snips + z95 * seSNIPS),
                         effectiveSampleSize: sumW * sumW / sumW2)
    }
}

// MARK: - Reading the log

/// When a report stops: at its caller's deadline, or once its caller is gone.
final class ReportLimit: Sendable {
    let deadline: ContinuousClock.Instant?
    private let cancelled = Atomic<Bool>(false)

    init(deadline: ContinuousClock.Instant?) { self.deadline = deadline }

    func cancel() { cancelled.store(true, ordering: .relaxed) }

    /// Throws DEADLINE_EXCEEDED past the deadline, CANCELLED once cancelled.
    func check(read: Int) throws {
        if cancelled.load(ordering: .relaxed) { throw RPCError(.cancelled, "the caller went away; the report stopped (\(read) decisions read)") }
        if let deadline, ContinuousClock.now >= deadline {
            throw RPCError(.deadlineExceeded, "from_ms/to_ms: the report did not finish within the call's deadline (\(read) decisions read); narrow the window or allow more time")
        }
    }
}

extension DecisionStore {
    /// A conversion, click or other outcome reported on a logged decision.
    struct LoggedOutcome {
        var action: String
        var kind: DecisionV1.Outcome
        var value: Double
    }

    /// Most decisions one LiftReport or EvaluatePolicy reads.
    static let maxReportDecisions = 5_000_000

    /// Calls `body` with every decision made in [fromMs, toMs), oldest first, and the
    /// outcomes reported on it (whenever they happened). One read transaction; a window of
    /// more than `maxReportDecisions` is refused before anything is loaded; past `limit`'s
    /// deadline, or once its caller is gone, it stops.
    func forEachDecision(fromMs: Int64, toMs: Int64, limit: ReportLimit? = nil,
                         _ body: (DecisionV1.DecisionRecord, [LoggedOutcome]) throws -> Void) throws {
        var read = 0
        func inTime() throws { try limit?.check(read: read) }
        try inTime()
        // Decision ids are time-ordered: a time range is a key range.
        let (low, high) = (TimeOrderedID.lowerBound(Self.decisionIDPrefix, atMs: fromMs),
                           TimeOrderedID.lowerBound(Self.decisionIDPrefix, atMs: toMs))
        try pool.read { db in
            // One key-range probe: is there a decision past the limit? (the window is refused whole)
            guard try String.fetchOne(db, sql: "SELECT decision_id FROM decision WHERE decision_id >= ? AND decision_id < ? ORDER BY decision_id LIMIT 1 OFFSET ?",
                                      arguments: [low, high, Self.maxReportDecisions]) == nil else {
                throw RPCError(.resourceExhausted, "from_ms/to_ms: the window holds more than \(Self.maxReportDecisions) decisions; narrow it")
            }
            var outcomes: [String: [LoggedOutcome]] = [:]
            let rows = try Row.fetchCursor(db, sql: "SELECT decision_id, action_id, kind, value FROM outcome WHERE decision_id >= ? AND decision_id < ?",
                                           arguments: [low, high])
            while let row = try rows.next() {
                outcomes[row[0], default: []].append(LoggedOutcome(action: row[1], kind: DecisionV1.Outcome(rawValue: row[2]), value: row[3]))
            }
            try inTime()
            let decisions = try Row.fetchCursor(db, sql: "SELECT decision_id, record FROM decision WHERE decision_id >= ? AND decision_id < ? ORDER BY decision_id",
                                                arguments: [low, high])
            while let row = try decisions.next() {
                let id: String = row[0]
                try body(try DecisionStore.record(stored: row[1]), outcomes[id] ?? [])
                read += 1
                if read % 1024 == 0 { try inTime() }
            }
        }
    }
}

extension DecisionV1.DecisionRecord {
    /// The value of the conversions reported on `action` in this decision (a conversion
    /// without a value counts the action's value).
    func conversionValue(of action: String?, _ outcomes: [DecisionStore.LoggedOutcome]) -> Double {
        outcomes.reduce(0) { sum, o in
            guard o.kind == .conversion, action == nil || o.action == action else { return sum }
            return sum + (o.value > 0 ? o.value : candidates.first { $0.actionId == o.action }?.value ?? 0)
        }
    }
}

// MARK: - LiftReport and EvaluatePolicy

extension DecisionService {
    /// LiftReport and EvaluatePolicy read up to `maxReportDecisions` records each: they run
    /// one at a time, on a thread of their own (Swift's cooperative pool, one thread per core,
    /// serves every other call), and give up at their caller's deadline (one that waited past
    /// it does not start).
    static let reports = DispatchQueue(label: "arbiter.decision.reports")

    func report<T: Sendable>(_ body: @escaping @Sendable (ReportLimit) throws -> T) async throws -> T {
        let limit = ReportLimit(deadline: RPCDeadline.current)
        // A caller that went away (its connection closed) stops its report too: the reports
        // behind it wait for no one.
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { continuation in
                Self.reports.async { continuation.resume(with: Result { try body(limit) }) }
            }
        } onCancel: {
            limit.cancel()
        }
    }

    /// Whether a decision is in an action's lift comparison by its candidate for the action:
    /// eligible, banned by an override (intent to treat), or excluded only by a cap or a
    /// suppression (which the treatment itself fills). ReportOutcome takes a conversion on
    /// such an action, as on one held out, so that both sides' conversions are counted alike.
    static func inActionScope(_ candidate: DecisionV1.CandidateExplanation) -> Bool {
        candidate.eligible || candidate.excludedBy.hasPrefix(banPrefix)
            || candidate.excludedBy.hasPrefix(capPrefix) || candidate.excludedBy.hasPrefix(suppressionPrefix)
    }

    /// Validates a report window: from ≥ 0, to after from (0: now).
    func window(_ from: Int64, _ to: Int64) throws(RPCError) -> (Int64, Int64) {
        guard from >= 0 else { throw .invalidArgument(field: "from_ms", "must not be negative") }
        let to = to == 0 ? clock() + 1 : to
        guard to > from else { throw .invalidArgument(field: "to_ms", "must be after from_ms (0: now)") }
        return (from, to)
    }

    func liftReport(_ request: DecisionV1.LiftReportRequest, limit: ReportLimit? = nil) throws -> DecisionV1.LiftReportResponse {
        let (from, to) = try window(request.fromMs, request.toMs)
        if !request.segment.isEmpty { try Names.check(request.segment, field: "segment") }
        let holdout = configuration.holdout
        var response = DecisionV1.LiftReportResponse()
        // Which decisions are compared, and which side each is on (nil: not in scope).
        let side: (DecisionV1.DecisionRecord) -> Bool?
        switch (request.actionId.isEmpty, request.overrideId.isEmpty) {
        case (false, false):
            throw RPCError.invalidArgument(field: "override_id", "give action_id or override_id, not both")
        case (false, true):
            let id = request.actionId
            try Names.check(id, field: "action_id")
            guard let spec = store.catalog().actions.first(where: { $0.id == id }) else {
                throw RPCError(.notFound, "action_id: no action \"\(id)\"")
            }
            response.comparison = "action holdout: \(id)"
            response.expectedControlShare = spec.action.holdoutShare
            if spec.action.holdoutShare == 0 { response.notes.append("action \(id) has no holdout (holdout_share 0): nothing to compare with") }
            // Intent to treat: the holdout is drawn among persons the action is eligible for,
            // before overrides; a person an override then banned it for stays on the treated side
            // (had they been held out, they would count as control). A decision where a cap or a
            // suppression excluded it is in scope too, on the person's assigned side: the
            // treatment fills those (its own offers use up the caps, its conversions start the
            // suppressions), so leaving such decisions out would let treated persons into a
            // window later than control persons, or not at all.
            let share = spec.action.holdoutShare
            side = { record in
                guard !record.holdout else { return nil }
                if record.heldOutActions.contains(id) { return false }
                guard let candidate = record.candidates.first(where: { $0.actionId == id }), Self.inActionScope(candidate) else { return nil }
                if candidate.eligible || candidate.excludedBy.hasPrefix(Self.banPrefix) { return true }
                guard !record.personId.isEmpty else { return nil }
                return holdout.position(of: record.personId, scope: "action:\(id)") >= share
            }
        case (true, false):
            let id = request.overrideId
            try Names.check(id, field: "override_id")
            guard store.overrideExists(id) else {
                throw RPCError(.notFound, "override_id: no override \"\(id)\"")
            }
            response.comparison = "override \(id): applied against its control share (the algorithm's choice)"
            response.expectedControlShare = holdout.overrideControlShare
            side = { record in record.overrides.first { $0.overrideId == id }.map(\.applied) }
        case (true, true):
            response.comparison = "global holdout: the learned policy against the default experience (rules_only)"
            response.expectedControlShare = holdout.share
            side = { record in !record.holdout }
        }

        struct Unit {
            var treated: Bool
            var decisions = 0
            var converted = false
            var value = 0.0
        }
        var units: [String: Unit] = [:]
        var anonymous = 0
        var switched = Set<String>()
        // A person enters with their first decision in scope (in the segment, on a side), and
        // from then every decision of theirs counts, in scope or not: later scope depends on the
        // treatment itself (an offer the treated side got uses up a cap, so the action is no
        // longer eligible there), and dropping those decisions would compare unlike persons.
        try store.forEachDecision(fromMs: from, toMs: to, limit: limit) { record, outcomes in
            let inScope = request.segment.isEmpty || record.segments.contains(request.segment) ? side(record) : nil
            guard !record.personId.isEmpty else { if inScope != nil { anonymous += 1 }; return }
            guard var unit = units[record.personId] ?? inScope.map({ Unit(treated: $0) }) else { return }
            if let inScope, unit.treated != inScope { switched.insert(record.personId) }
            unit.decisions += 1
            let value = record.conversionValue(of: nil, outcomes)
            unit.converted = unit.converted || outcomes.contains { $0.kind == .conversion }
            unit.value += value
            units[record.personId] = unit
        }

        func stats(_ treated: Bool) -> (DecisionV1.ArmStats, [Double]) {
            var arm = DecisionV1.ArmStats()
            var values: [Double] = []
            for unit in units.values where unit.treated == treated {
                arm.persons += 1
                arm.decisions += UInt64(unit.decisions)
                if unit.converted { arm.convertedPersons += 1 }
                arm.value += unit.value
                values.append(unit.value)
            }
            if arm.persons > 0 {
                arm.conversionRate = Double(arm.convertedPersons) / Double(arm.persons)
                arm.valuePerPerson = arm.value / Double(arm.persons)
            }
            return (arm, values)
        }
        let (treated, treatedValues) = stats(true)
        let (control, controlValues) = stats(false)
        response.treated = treated
        response.control = control
        if let c = Statistics.proportions(x1: Int(treated.convertedPersons), n1: Int(treated.persons),
                                          x0: Int(control.convertedPersons), n0: Int(control.persons)) {
            response.absoluteLift = c.absolute
            response.absoluteLiftCi95 = .init(c.absoluteCI)
            if let relative = c.relative, let ci = c.relativeCI {
                response.relativeLift = relative
                response.relativeLiftCi95 = .init(ci)
            } else {
                response.notes.append("no relative lift: a side has no conversions")
            }
        } else {
            response.notes.append("no lift: \(treated.persons == 0 ? "treated" : "control") has no persons in this window")
        }
        if let v = Statistics.means(treatedValues, controlValues) {
            response.valueLift = v.difference
            response.valueLiftCi95 = .init(v.ci)
        } else if treated.persons > 0, control.persons > 0 {
            response.notes.append("no value lift: a side has fewer than 2 persons")
        }
        response.srmPValue = Statistics.srmPValue(treated: Int(treated.persons), control: Int(control.persons),
                                                  expectedControlShare: response.expectedControlShare)
        response.srmWarning = response.srmPValue < 0.001
        if response.srmWarning {
            response.notes.append(String(format: "sample-ratio mismatch: %llu control persons of %llu where %.1f %% were expected (p = %.2g); the split is broken and the lift is not to be trusted",
                                         control.persons, control.persons + treated.persons, response.expectedControlShare * 100, response.srmPValue))
        }
        if min(treated.convertedPersons, control.convertedPersons) < 10, treated.persons > 0, control.persons > 0 {
            response.notes.append("fewer than 10 converted persons on a side: the intervals are rough")
        }
        if anonymous > 0 { response.notes.append("\(anonymous) decisions without a known person were left out") }
        if !switched.isEmpty {
            response.notes.append("\(switched.count) persons had decisions on both sides (merged persons or a changed salt/share); each counts on the side of their first decision")
        }
        return response
    }

    func evaluatePolicy(_ request: DecisionV1.EvaluatePolicyRequest, limit: ReportLimit? = nil) throws -> DecisionV1.EvaluatePolicyResponse {
        let (from, to) = try window(request.fromMs, request.toMs)
        guard let policy = DecisionPolicy(request.policy) else {
            throw RPCError.invalidArgument(field: "policy", "must be no_exploration, rules_only, highest_value, always:<action id> or logging, got \"\(request.policy)\"")
        }
        if case .always(let id) = policy {
            try Names.check(id, field: "policy (always:<action id>)")
            // Retired actions count: the log may hold decisions from when they were offered.
            guard store.catalog().actions.contains(where: { $0.id == id }) else {
                throw RPCError(.notFound, "policy: no action \"\(id)\" (always:<action id>)")
            }
        }
        var weights: [Double] = []
        var rewards: [Double] = []
        var response = DecisionV1.EvaluatePolicyResponse()
        var logged = 0.0
        var unsupported = 0
        var withoutPropensity = 0
        try store.forEachDecision(fromMs: from, toMs: to, limit: limit) { record, outcomes in
            // The holdout's and a forced action's choices were certain: no propensity to weigh
            // by. A ban only took its action out; the draw among the rest is logged as usual.
            let forced = record.overrides.contains { effect in
                effect.applied && !record.candidates.contains { $0.excludedBy.hasPrefix("\(Self.banPrefix)\(effect.overrideId) ") }
            }
            guard !record.holdout, !forced else {
                response.excluded += 1
                return
            }
            guard let first = record.actions.first else {
                // Nothing was eligible: every policy shows nothing and earns nothing.
                weights.append(1)
                rewards.append(0)
                response.matched += 1
                return
            }
            guard first.propensity > 0 else {
                // A record without its propensity (none is logged as 0): nothing to weigh by.
                withoutPropensity += 1
                response.excluded += 1
                return
            }
            let reward = record.conversionValue(of: first.actionId, outcomes)
            logged += reward
            let weight: Double
            if policy == .logging {
                weight = 1
            } else if let k = policy.ranking(record.candidates).first {
                let choice = record.candidates[k].actionId
                weight = choice == first.actionId ? 1 / first.propensity : 0
                // The log could never have shown the target's choice first here: what it would
                // earn is not in the data (positivity), and the estimate counts it as 0.
                if record.candidates[k].choiceProbability == 0 { unsupported += 1 }
            } else {
                // The target shows nothing here (its action is not eligible): it earns 0, known without estimating.
                weights.append(1)
                rewards.append(0)
                return
            }
            if weight > 0 { response.matched += 1 }
            weights.append(weight)
            rewards.append(reward)
        }
        response.decisions = UInt64(weights.count)
        if response.decisions > 0 { response.loggedValue = logged / Double(response.decisions) }
        if let estimate = Statistics.offPolicy(weights: weights, rewards: rewards) {
            response.ips = estimate.ips
            response.ipsCi95 = .init(estimate.ipsCI)
            if let snips = estimate.snips, let ci = estimate.snipsCI {
                response.snips = snips
                response.snipsCi95 = .init(ci)
            } else {
                response.notes.append("no SNIPS estimate: the target agrees with no logged decision here")
            }
            response.effectiveSampleSize = estimate.effectiveSampleSize
            // All products zero: the intervals have no width, which is not certainty.
            if !zip(weights, rewards).contains(where: { $0 > 0 && $1 > 0 }) {
                response.notes.append("no reward observed where the target agrees with the log (\(response.matched) decisions): the estimates are 0 with intervals of no width, which says only that the value is small, not that it is 0")
            }
        } else {
            response.notes.append("no decision in this window to evaluate")
        }
        if unsupported > 0 {
            response.notes.append("\(unsupported) decisions where the target's choice had no chance of being logged first (choice probability 0: an exploration floor of 0?): what it would have earned there is unknown, and the estimates count it as 0")
        }
        if withoutPropensity > 0 {
            response.notes.append("\(withoutPropensity) decisions without a logged propensity were left out (in excluded)")
        }
        return response
    }
}

extension DecisionV1.Interval {
    init(_ bounds: (Double, Double)) {
        self.init()
        low = bounds.0
        high = bounds.1
    }
}
