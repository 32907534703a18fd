import Contracts
import Crypto
import Foundation
import Metrics
import RPC
import Rules
import Storage
import Synchronization

/// The decision service's settings (the `decision` section of `--config`). Defaults per field.
public struct DecisionConfiguration: Sendable, Codable, Equatable {
    public var learner = LearnerConfiguration()
    /// The global holdout and the overrides' control share.
    public var holdout = HoldoutConfiguration()
    /// Decide answers within this many milliseconds, or the caller's deadline if sooner. Default 50.
    public var decideBudgetMs = 50
    /// Longest wait for the identity or the profile service within a Decide. Default 20.
    public var peerTimeoutMs = 20
    /// Failed calls in a row after which a peer is skipped for a while (see `breakerCooldownMs`). Default 5.
    public var breakerFailures = 5
    /// The longest a peer is skipped. The first skip lasts an eighth of it, and each failed
    /// probe after one doubles it up to this, so a peer that stalled for 100 ms is asked again
    /// after 125 ms, and one that is down is asked about once a second. Default 1000.
    public var breakerCooldownMs = 1000
    /// Longest wait for the routing service with `deliver` when the caller set no deadline
    /// (delivery is not bound by `decideBudgetMs`: the decision is logged first). Default 2000.
    public var routeTimeoutMs = 2000
    /// Decisions older than this many days are deleted with their offers and outcomes
    /// (`DecisionStore.pruner`); 0 keeps every decision. A cap or suppression window may not be
    /// longer. Default 0. A decision over a 50-action catalog takes ~4.6 KB: at 3,000
    /// decisions/s the log grows ~1.2 TB a day.
    public var logRetentionDays = 0
    /// How many recent offers and outcomes are kept in memory for caps and suppressions, so
    /// that Decide reads no SQLite for them (`RecentHistory`); a window reaching back past
    /// what memory holds is read from the file. About 85 bytes each, and they are read at
    /// start (1.1 million: 90 MB, 0.9 s). 0 reads every history from the file. Default 1,000,000.
    public var recentHistoryEntries = 1_000_000
    /// Under concurrent Decides, the decision log begins a transaction at most once per this
    /// many milliseconds (after one that held more than a decision), so that more decisions
    /// share one: fewer pages are written per decision. A decision waits at most this much
    /// longer for its commit; one caller at a time does not wait. 0 writes at once. Default 2.
    public var logCommitIntervalMs = 2

    public init() {}

    /// Missing keys keep their defaults; a value out of range stops the service at start.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = Self()
        func read(_ key: CodingKeys, _ fallback: Int, _ range: ClosedRange<Int>) throws -> Int {
            let value = try c.decodeIfPresent(Int.self, forKey: key) ?? fallback
            guard range.contains(value) else {
                throw DecodingError.dataCorruptedError(forKey: key, in: c, debugDescription: "\(key.stringValue) must be between \(range.lowerBound) and \(range.upperBound), got \(value)")
            }
            return value
        }
        learner = try c.decodeIfPresent(LearnerConfiguration.self, forKey: .learner) ?? d.learner
        holdout = try c.decodeIfPresent(HoldoutConfiguration.self, forKey: .holdout) ?? d.holdout
        decideBudgetMs = try read(.decideBudgetMs, d.decideBudgetMs, 5...60_000)
        peerTimeoutMs = try read(.peerTimeoutMs, d.peerTimeoutMs, 1...60_000)
        breakerFailures = try read(.breakerFailures, d.breakerFailures, 1...1000)
        breakerCooldownMs = try read(.breakerCooldownMs, d.breakerCooldownMs, 1...600_000)
        routeTimeoutMs = try read(.routeTimeoutMs, d.routeTimeoutMs, 1...60_000)
        logRetentionDays = try read(.logRetentionDays, d.logRetentionDays, 0...36_500)
        recentHistoryEntries = try read(.recentHistoryEntries, d.recentHistoryEntries, 0...1_000_000_000)
        logCommitIntervalMs = try read(.logCommitIntervalMs, d.logCommitIntervalMs, 0...1000)
    }

    /// Each cap and suppression window (as `field`: seconds) longer than the log keeps
    /// offers and outcomes: such a window would count what was deleted.
    func windowsBeyondRetention(_ windows: [(field: String, seconds: Int64)]) -> [(field: String, seconds: Int64)] {
        guard logRetentionDays > 0 else { return [] }
        return windows.filter { $0.seconds > Int64(logRetentionDays) * 86_400 }
    }
}

/// arbiter.decision.v1.Decision: the catalog, the contact policy, Decide and learning
/// from outcomes. Decide reads the person from the identity and profile services and
/// answers even when they fail (degraded, with the reasons).
public struct DecisionService: RPCService {
    public let store: DecisionStore
    let configuration: DecisionConfiguration
    let identity: RPCClient?
    let profile: RPCClient?
    let routing: RPCClient?
    let clock: @Sendable () -> Int64
    let random: Exclusive<SplitMix64>
    let identityBreaker: Breaker
    let profileBreaker: Breaker
    let personLocks: [Exclusive<Void>]
    let metrics = DecideMetrics()
    /// The request ids of the Decides under way: a second with one of them is ABORTED.
    let requestsUnderWay = Exclusive<Set<String>>([])

    public static let maxCount = 20
    public static let maxContext = 50

    /// - Parameter seed: seeds exploration (tests and simulations replay); nil: random.
    public init(store: DecisionStore, configuration: DecisionConfiguration = .init(), identity: RPCClient? = nil,
                profile: RPCClient? = nil, routing: RPCClient? = nil, seed: UInt64? = nil,
                clock: @escaping @Sendable () -> Int64 = { Int64(Date().timeIntervalSince1970 * 1000) }) {
        self.store = store
        self.configuration = configuration
        self.identity = identity
        self.profile = profile
        self.routing = routing
        self.clock = clock
        random = Exclusive(SplitMix64(seed: seed ?? UInt64.random(in: .min ... .max)))
        let cooldown = Duration.milliseconds(configuration.breakerCooldownMs)
        identityBreaker = Breaker(name: "identity", failures: configuration.breakerFailures, cooldown: cooldown)
        profileBreaker = Breaker(name: "profile", failures: configuration.breakerFailures, cooldown: cooldown)
        personLocks = (0..<64).map { _ in Exclusive(()) }
    }

    public func register(in router: inout RPCRouter) {
        let methods = DecisionV1.Decision.self
        router.register(methods.upsertAction) { request, _ in try upsertAction(request) }
        router.register(methods.listActions) { request, _ in try listActions(request) }
        router.register(methods.retireAction) { request, _ in
            try Names.check(request.id, field: "id")
            return try store.retire(request.id, nowMs: clock())
        }
        router.register(methods.setContactPolicy) { request, _ in try setContactPolicy(request) }
        router.register(methods.getContactPolicy) { _, _ in store.policy }
        // Decide and ReportOutcome run on the connection's event loop: no thread hop between
        // the socket, the profile call and the answer (the suite at 3,000/s: 10 % less CPU in
        // alternating 60 s runs). They read memory and await the log's writer; a history or
        // decision older than memory holds is read from the file on the concurrent pool. The
        // methods that scan or write SQLite stay on the pool.
        router.register(methods.decide, execution: .eventLoop) { request, _ in try await decide(request) }
        router.register(methods.getDecision) { request, _ in
            try Self.checkDecisionID(request.decisionId)
            guard let record = try store.decision(request.decisionId) else {
                throw RPCError(.notFound, "decision_id: no decision \"\(request.decisionId)\"")
            }
            return record
        }
        router.register(methods.reportOutcome, execution: .eventLoop) { request, _ in try await reportOutcome(request) }
        router.register(methods.liftReport) { request, _ in try await report { try liftReport(request, limit: $0) } }
        router.register(methods.evaluatePolicy) { request, _ in try await report { try evaluatePolicy(request, limit: $0) } }
        router.register(methods.setOverride) { request, _ in
            guard let override = request.override else { throw RPCError.invalidArgument(field: "override", "is required") }
            return try store.setOverride(override, nowMs: clock())
        }
        router.register(methods.listOverrides) { request, _ in try listOverrides(request) }
        router.register(methods.endOverride) { request, _ in
            try store.endOverride(request.id, author: request.author, reason: request.reason, nowMs: clock())
        }
    }

    func upsertAction(_ request: DecisionV1.UpsertActionRequest) throws -> DecisionV1.Action {
        guard let action = request.action else { throw RPCError.invalidArgument(field: "action", "is required") }
        let spec = try ActionSpec(action)
        // Checked as written, not as read back (a stored action from before still loads): the
        // rule's kinds, and a purpose SetConsent could record.
        _ = try ActionSpec.rule(action.eligibility, field: "action.eligibility", kinds: Rule.standardKind)
        if !action.consentPurpose.isEmpty { try Names.checkPurpose(action.consentPurpose, field: "action.consent_purpose") }
        try checkRetention(Self.windows(of: action))
        return try store.upsert(spec, nowMs: clock())
    }

    func setContactPolicy(_ request: DecisionV1.ContactPolicy) throws -> DecisionV1.ContactPolicy {
        guard request.caps.count <= 50 else { throw RPCError.invalidArgument(field: "caps", "at most 50") }
        for (i, cap) in request.caps.enumerated() { try ActionSpec.check(cap, field: "caps[\(i)]", onAction: false) }
        try checkRetention(request.caps.enumerated().map { ("caps[\($0)].window_seconds", $1.windowSeconds) })
        return try store.setPolicy(request.caps)
    }

    /// The cap and suppression windows of an action, named as its fields.
    static func windows(of action: DecisionV1.Action) -> [(field: String, seconds: Int64)] {
        action.caps.enumerated().map { ("action.caps[\($0)].window_seconds", $1.windowSeconds) }
            + action.suppressions.enumerated().map { ("action.suppressions[\($0)].window_seconds", $1.windowSeconds) }
    }

    private func checkRetention(_ windows: [(field: String, seconds: Int64)]) throws {
        if let window = configuration.windowsBeyondRetention(windows).first {
            throw RPCError.invalidArgument(field: window.field, "\(window.seconds) s is longer than the decision log is kept (decision.logRetentionDays \(configuration.logRetentionDays))")
        }
    }

    /// The stored catalog's and contact policy's windows that the configured retention
    /// would cut short (checked at start: the service refuses to run with them).
    public func windowsBeyondRetention() -> [String] {
        let actions = store.catalog().actions.filter { !$0.action.retired }
        let windows = actions.flatMap { spec in Self.windows(of: spec.action).map { ("\(spec.id): \($0.field)", $0.seconds) } }
            + store.policy.caps.enumerated().map { ("contact policy: caps[\($0)].window_seconds", $1.windowSeconds) }
        return configuration.windowsBeyondRetention(windows).map { "\($0.field) is \($0.seconds) s" }
    }

    // MARK: - Decide

    /// What the service knows about the person for one decision.
    struct Person {
        var id: String?
        var profile: ProfileV1.ProfileView?
        /// False when the profile could not be read (consent unknown).
        var profileKnown: Bool
    }

    func decide(_ request: DecisionV1.DecideRequest) async throws -> DecisionV1.DecideResponse {
        try Names.check(request.placement, field: "placement")
        guard request.count <= Self.maxCount else {
            throw RPCError.invalidArgument(field: "count", "at most \(Self.maxCount), got \(request.count)")
        }
        guard request.context.count <= Self.maxContext else {
            throw RPCError.invalidArgument(field: "context", "at most \(Self.maxContext) entries, got \(request.context.count)")
        }
        for (key, value) in request.context {
            try Names.check(key, field: "context key")
            guard value.utf8.count <= 256 else { throw RPCError.invalidArgument(field: "context[\(key)]", "is longer than 256 bytes") }
        }
        if request.deliver && routing == nil {
            throw RPCError(.failedPrecondition, "deliver: this decision service has no routing service (--routing)")
        }
        if !request.requestId.isEmpty { try Names.checkKey(request.requestId, field: "request_id") }
        let localID: String?
        switch request.person?.ref {
        case .personId(let id)?:
            localID = try Names.personID(id, field: "person.person_id")
        case .identifiers(let list)?:
            localID = nil
            guard !list.identifiers.isEmpty else { throw RPCError.invalidArgument(field: "person.identifiers", "is empty") }
        case nil:
            throw RPCError.invalidArgument(field: "person", "is required (person_id or identifiers)")
        }
        guard !request.requestId.isEmpty else { return try await decideAnew(request, localID: localID, requestHash: nil) }

        // A request id: the decision the log holds for it, or a new one logged with it. (An id
        // erased since is NOT_FOUND, as for a Decide without one: the erasure took the decision.)
        if let localID, store.currentPerson(localID) == nil {
            throw Self.erased(localID, field: "person.person_id")
        }
        let id = request.requestId
        guard requestsUnderWay.withLock({ $0.insert(id).inserted }) else {
            throw RPCError(.aborted, "request_id: a Decide with request_id \"\(id)\" is under way; retry when it has answered")
        }
        defer { _ = requestsUnderWay.withLock { $0.remove(id) } }
        let hash = Self.requestHash(request)
        // Read from the file: not on the event loop.
        let earlier = try await withTaskExecutorPreference(globalConcurrentExecutor) { [store] in try store.decision(requestId: id) }
        guard let record = earlier else { return try await decideAnew(request, localID: localID, requestHash: hash) }
        guard Data(record.requestHash) == hash else {
            throw RPCError(.alreadyExists, "request_id: \"\(id)\" was used for a different request")
        }
        metrics.replayed.increment()
        // As first answered and routed: for the person it was made for then (merges since
        // move the record, not the answer), so that routing finds the same Routes by their keys.
        var first = record
        first.personId = record.requestPersonId
        var response = Self.response(first, explain: request.explain)
        response.replayed = true
        if request.deliver { response.actions = await deliver(first, context: request.context) }
        return response
    }

    /// SHA-256 of what a Decide asks for (person, placement, context, count, deliver; map
    /// order aside, every text with its length): a reused request id with a different
    /// request is refused. `explain` is left out: every logged decision can be explained.
    static func requestHash(_ request: DecisionV1.DecideRequest) -> Data {
        var text = ""
        func add(_ tag: String, _ value: String) { text += "\(tag)\(value.utf8.count):\(value)\n" }
        switch request.person?.ref {
        case .personId(let id)?: add("p", id)
        case .identifiers(let list)?:
            // In any order: a client may build them from an unordered collection.
            for identifier in list.identifiers.sorted(by: { ($0.type, $0.value) < ($1.type, $1.value) }) {
                add("i", identifier.type)
                add("=", identifier.value)
            }
        case nil: break
        }
        add("l", request.placement)
        for key in request.context.keys.sorted() { add("k", key); add("v", request.context[key]!) }
        add("n", String(max(request.count, 1)))
        add("d", request.deliver ? "1" : "0")
        return Data(SHA256.hash(data: Data(text.utf8)))
    }

    /// NOT_FOUND for a person the identity feed erased, naming the field it was sent in.
    static func erased(_ person: String, field: String) -> RPCError {
        RPCError(.notFound, "\(field): person \(person) was erased")
    }

    /// A logged decision as Decide answers it.
    static func response(_ record: DecisionV1.DecisionRecord, explain: Bool) -> DecisionV1.DecideResponse {
        var response = DecisionV1.DecideResponse()
        response.decisionId = record.decisionId
        response.actions = record.actions
        response.modelVersion = record.modelVersion
        response.degraded = record.degraded
        response.degradedReasons = record.degradedReasons
        response.personId = record.personId
        response.decidedAtMs = record.decidedAtMs
        response.holdout = record.holdout
        response.heldOutActions = record.heldOutActions
        response.overrides = record.overrides
        if explain { response.explanations = record.candidates }
        return response
    }

    /// Decides, logs the decision (with `requestHash`, under the request's id) and delivers it.
    private func decideAnew(_ request: DecisionV1.DecideRequest, localID: String?, requestHash: Data?) async throws -> DecisionV1.DecideResponse {
        let started = ContinuousClock.now
        let budgetEnd = started + .milliseconds(configuration.decideBudgetMs)
        let deadline = RPCDeadline.current.map { min($0, budgetEnd) } ?? budgetEnd
        let peerTimeout = Duration.milliseconds(configuration.peerTimeoutMs)
        // Leave time to choose and log after the peers answer.
        let peersDeadline = deadline - .milliseconds(3)
        var reasons: [String] = []

        var person = Person(id: localID, profile: nil, profileKnown: false)
        if case .identifiers(let list)? = request.person?.ref {
            var resolve = IdentityV1.ResolveRequest()
            resolve.identifiers = list.identifiers
            switch await PeerCall.call(identity, identityBreaker, IdentityV1.Identity.resolve, resolve, deadline: peersDeadline, timeout: peerTimeout) {
            case .answered(let response): person.id = response.personId.isEmpty ? nil : response.personId
            case .unknown: person.id = nil
            // Identifiers the identity service cannot read are the client's error (a malformed
            // email, an unknown type), not a reason to decide degraded.
            case .rejected(let error) where error.code == .invalidArgument: throw RPCError(.invalidArgument, "person.\(error.message)")
            case .rejected(let error): reasons.append(PeerCall.reason(identityBreaker, error))
            case .failed(let reason): reasons.append(reason)
            }
        }
        if let given = person.id {
            // No new data is kept for an erased person (the profile service refuses it too, with
            // a NOT_FOUND that would read here as a person not seen yet). A person merged away
            // is the survivor, also when the profile service cannot say so (degraded): its
            // holdout side, caps and log are the survivor's.
            // The field the client sent the person in (identifiers resolve to an erased id too).
            let field = localID == nil ? "person.identifiers" : "person.person_id"
            guard let id = store.currentPerson(given) else { throw Self.erased(given, field: field) }
            person.id = id
            var get = ProfileV1.GetProfileRequest()
            var ref = CommonV1.PersonRef()
            ref.ref = .personId(id)
            get.person = ref
            switch await PeerCall.call(profile, profileBreaker, ProfileV1.Profile.getProfile, get, deadline: peersDeadline, timeout: peerTimeout) {
            case .answered(let view):
                person.profile = view
                person.profileKnown = true
                // A person merged away is answered by its survivor: decide (and count caps) for it.
                if !view.personId.isEmpty { person.id = view.personId }
            case .unknown: person.profileKnown = true
            case .rejected(let error): reasons.append(PeerCall.reason(profileBreaker, error))
            case .failed(let reason): reasons.append(reason)
            }
            if !person.profileKnown {
                // Who the id is now, as the feed said (merges older than memory holds, or from
                // before a restart), since the profile service cannot say. Read from the file:
                // not on the event loop. Should the read fail, the id stands.
                let inFile = await withTaskExecutorPreference(globalConcurrentExecutor) { [store] in
                    Result { try store.survivorInFile(id) }
                }
                switch inFile {
                case .success(nil): throw Self.erased(given, field: field)
                case .success(let survivor?): person.id = survivor
                case .failure(let error): reasons.append("merges: not read (\(error))")
                }
            }
        } else if reasons.isEmpty {
            person.profileKnown = true  // an unknown person: no profile, and no failure
        }

        let choosing = ContinuousClock.now
        metrics.peers.recordNanoseconds((choosing - started).nanoseconds)
        let now = clock()
        let unit = person.id ?? Self.unit(request.person)
        let rules = Rules(store, nowMs: now)
        let choose = { try self.choose(request, person: person, unit: unit, reasons: reasons, rules: rules, nowMs: now) }
        var record: DecisionV1.DecisionRecord
        if let id = person.id {
            let lock = personLocks[Int(UInt(bitPattern: id.hashValue) % UInt(personLocks.count))]
            let chooseLocked = { try lock.withLock { _ throws in try choose() } }
            if store.historyInMemory(sinceMs: rules.historySinceMs) {
                record = try chooseLocked()
            } else {
                // The person's history is read from the file: not on the event loop.
                record = try await withTaskExecutorPreference(globalConcurrentExecutor) { try chooseLocked() }
            }
        } else {
            record = try choose()
        }
        if let requestHash {
            record.requestId = request.requestId
            record.requestHash = [UInt8](requestHash)
            record.requestPersonId = record.personId
        }
        let logging = ContinuousClock.now
        metrics.choose.recordNanoseconds((logging - choosing).nanoseconds)
        // The caller has given up (its answer is DEADLINE_EXCEEDED either way): nothing is
        // logged, so its offers take no cap and teach nothing, and a retry starts afresh.
        if let callerDeadline = RPCDeadline.current, logging >= callerDeadline {
            store.abandon(record)
            throw RPCError(.deadlineExceeded, "deadline exceeded before the decision was logged; nothing was kept")
        }
        let arms = record.actions.flatMap { ArmKey.learned($0.actionId, in: record) }
        try await store.log(record, arms: arms)
        metrics.log.recordNanoseconds((ContinuousClock.now - logging).nanoseconds)
        // The caller gave up while it was being logged (the server answered DEADLINE_EXCEEDED
        // and cancelled this call, or the connection closed): it never sees this decision, so
        // nothing of it is kept either, and nothing is delivered. Written off the event loop; a
        // failure to undo it is thrown, so that the server logs it.
        if Task.isCancelled {
            try await withTaskExecutorPreference(globalConcurrentExecutor) { [store] in try store.void(record, arms: arms) }
            throw CancellationError()
        }
        (record.degraded ? metrics.degraded : metrics.complete).increment()

        var response = Self.response(record, explain: request.explain)
        if request.deliver { response.actions = await deliver(record, context: request.context) }
        return response
    }

    /// The largest page ListActions gives (a page also stops at `AnswerSize.listBudget`).
    public static let maxActionsPage = 1_000

    /// A page of the catalog in id order: the actions after `page_token` (the last id of the
    /// page before), `page_size` of them at most (0: all), and fewer if the next would take
    /// the page past `AnswerSize.listBudget` (never none).
    func listActions(_ request: DecisionV1.ListActionsRequest) throws -> DecisionV1.ListActionsResponse {
        guard request.pageSize <= Self.maxActionsPage else {
            throw RPCError.invalidArgument(field: "page_size", "must be at most \(Self.maxActionsPage), got \(request.pageSize)")
        }
        if !request.pageToken.isEmpty { try Names.check(request.pageToken, field: "page_token") }
        let (actions, version) = store.catalog()
        let listed = actions.lazy.filter { (request.includeRetired || !$0.action.retired) && $0.id > request.pageToken }
        var response = DecisionV1.ListActionsResponse()
        response.catalogVersion = version
        guard request.pageSize > 0 else {
            response.actions = listed.map(\.action)
            return response
        }
        // One more than the page, to know whether more follow.
        let candidates = Array(listed.prefix(Int(request.pageSize) + 1))
        let fit = AnswerSize.fitting(candidates.prefix(Int(request.pageSize)).lazy.map(\.encodedSize))
        response.actions = candidates.prefix(fit).map(\.action)
        if candidates.count > fit { response.nextPageToken = response.actions.last!.id }
        return response
    }

    /// The active overrides (with `include_ended` also the `ended_limit` that stopped most
    /// recently, default 1,000, at most 10,000), and on request their audit trail: the newest
    /// `history_limit` changes (default 1,000, at most 10,000), of one override or of all.
    func listOverrides(_ request: DecisionV1.ListOverridesRequest) throws -> DecisionV1.ListOverridesResponse {
        var response = DecisionV1.ListOverridesResponse()
        guard request.endedLimit <= 10_000 else {
            throw RPCError.invalidArgument(field: "ended_limit", "at most 10000, got \(request.endedLimit)")
        }
        if request.includeEnded {
            (response.overrides, response.endedTruncated) = store.overrides(
                nowMs: clock(), endedLimit: request.endedLimit == 0 ? 1000 : Int(request.endedLimit))
        } else {
            response.overrides = store.activeOverrides(nowMs: clock())
        }
        guard request.includeHistory else { return response }
        if !request.historyOverrideId.isEmpty { try Names.check(request.historyOverrideId, field: "history_override_id") }
        guard request.historyLimit <= 10_000 else {
            throw RPCError.invalidArgument(field: "history_limit", "at most 10000, got \(request.historyLimit)")
        }
        let limit = request.historyLimit == 0 ? 1000 : Int(request.historyLimit)
        (response.history, response.historyTruncated) = try store.overrideHistory(
            of: request.historyOverrideId.isEmpty ? nil : request.historyOverrideId, limit: limit)
        return response
    }

    /// Hands each chosen action to the routing service, concurrently, after the decision
    /// was logged; a failure is reported on its action and the decision stands.
    func deliver(_ record: DecisionV1.DecisionRecord, context: [String: String]) async -> [DecisionV1.RankedAction] {
        guard let routing else { return record.actions }
        let specs = Dictionary(store.catalog().actions.map { ($0.id, $0.action) }, uniquingKeysWith: { a, _ in a })
        let timeout = RPCDeadline.current.map { ContinuousClock.now.duration(to: $0) } ?? .milliseconds(configuration.routeTimeoutMs)
        return await withTaskGroup(of: (Int, DecisionV1.RankedAction).self) { group in
            for (rank, ranked) in record.actions.enumerated() {
                group.addTask {
                    var action = ranked
                    guard !record.personId.isEmpty else {
                        action.deliveryError = "NOT_FOUND: the person is not known; there is no one to deliver to"
                        return (rank, action)
                    }
                    var route = RoutingV1.RouteRequest()
                    var person = CommonV1.PersonRef()
                    person.ref = .personId(record.personId)
                    route.person = person
                    var message = RoutingV1.Message()
                    message.templateId = ranked.actionId
                    message.variables = ["decision_id": record.decisionId, "placement": record.placement]
                    // The request context travels as context.<key> (keys too long for that are left out).
                    for (key, value) in context where key.utf8.count + 8 <= Names.maxLength { message.variables["context.\(key)"] = value }
                    route.message = message
                    let spec = specs[ranked.actionId]
                    // The channel Decide chose and logged, then the others consent and the
                    // contact policy's channel caps allowed: no channel past its cap. Routing
                    // falls back to those when the first cannot reach the person. An action
                    // with no channels of its own: those the channel caps leave open (any,
                    // without channel caps; none open, and it is not routed).
                    if ranked.channel == .unspecified {
                        guard !ranked.fallbackChannels.isEmpty || !store.policy.caps.contains(where: { $0.scope == .channel }) else {
                            action.deliveryError = "FAILED_PRECONDITION: every channel is at its contact-policy cap"
                            return (rank, action)
                        }
                        route.allowedChannels = ranked.fallbackChannels
                    } else {
                        route.allowedChannels = [ranked.channel] + ranked.fallbackChannels
                    }
                    route.urgency = .normal
                    route.purpose = spec.map { $0.consentPurpose.isEmpty ? "service" : $0.consentPurpose } ?? "service"
                    route.idempotencyKey = "\(record.decisionId):\(ranked.actionId)"
                    do {
                        let delivery = try await routing.call(RoutingV1.Routing.route, route, timeout: max(timeout, .milliseconds(1)))
                        action.delivery = delivery
                        action.deliveryId = delivery.deliveryId
                        // Sent on a fallback: from now on the offer counts on that channel.
                        // (Should that write fail, the offer stays counted on the chosen channel.)
                        if delivery.state != .suppressed, delivery.channel != ranked.channel,
                           ranked.fallbackChannels.contains(delivery.channel) || ranked.channel == .unspecified {
                            try? await withTaskExecutorPreference(globalConcurrentExecutor) {
                                try store.rechannel(record, action: ranked.actionId, from: ranked.channel, to: delivery.channel)
                            }
                        }
                    } catch {
                        let error = error as? RPCError ?? RPCError(.unknown, "\(error)")
                        action.deliveryError = "\(error.code): \(error.message)"
                    }
                    return (rank, action)
                }
            }
            var actions = record.actions
            for await (rank, action) in group { actions[rank] = action }
            return actions
        }
    }

    /// The catalog and the contact policy one decision reads, taken once, and the earliest
    /// time their cap and suppression windows reach back to: the history Decide reads.
    struct Rules {
        let actions: [ActionSpec]
        let catalogVersion: UInt64
        let policy: DecisionV1.ContactPolicy
        let historySinceMs: Int64

        init(_ store: DecisionStore, nowMs now: Int64) {
            (actions, catalogVersion) = store.catalog()
            policy = store.policy
            let longest = actions.reduce(policy.caps.map(\.windowSeconds).max() ?? 0) { max($0, $1.longestWindowSeconds) }
            historySinceMs = now - longest * 1000
        }
    }

    /// Everything after the peers: candidates, holdouts, overrides, caps, scores, the draw.
    /// Runs under the person's lock and reserves the chosen offers before returning, so
    /// that two decisions for one person never both take a cap's last slot.
    ///
    /// `unit` is who holdouts and override control shares are assigned by: the person id, or
    /// the request's identifiers when the person could not be resolved.
    func choose(_ request: DecisionV1.DecideRequest, person: Person, unit: String, reasons: [String], rules: Rules,
                nowMs now: Int64) throws -> DecisionV1.DecisionRecord {
        let (actions, catalogVersion, policy) = (rules.actions, rules.catalogVersion, rules.policy)
        let holdout = configuration.holdout
        let control = holdout.isControl(unit)
        let facts = Facts(profile: person.profile, context: request.context)
        let history = try person.id.map { try store.history(person: $0, sinceMs: rules.historySinceMs) } ?? .init()
        // No person, and a failure on the way: the identity service did not say who this is.
        var usage = CapUsage(history: history, now: now, historyKnown: person.id != nil || reasons.isEmpty)

        var explanations: [DecisionV1.CandidateExplanation] = []
        var eligible: [(spec: ActionSpec, channels: [CommonV1.Channel], slot: Int)] = []
        explanations.reserveCapacity(actions.count)  // grown one append at a time: ~2 % of the service's CPU
        eligible.reserveCapacity(actions.count)
        var heldOut: [String] = []
        for spec in actions where !spec.action.retired {
            var explanation = DecisionV1.CandidateExplanation()
            explanation.actionId = spec.id
            explanation.value = spec.action.value
            explanation.lever = spec.lever
            switch exclusion(spec, request: request, person: person, facts: facts, usage: usage, policy: policy, now: now) {
            case .excluded(let reason):
                explanation.excludedBy = reason
            case .eligible where !control && spec.action.holdoutShare > 0
                && holdout.position(of: unit, scope: "action:\(spec.id)") < spec.action.holdoutShare:
                explanation.excludedBy = "holdout: held out for this person (the action's holdout, \(spec.action.holdoutShare) of persons)"
                heldOut.append(spec.id)
            case .eligible(let channels):
                explanation.eligible = true
                eligible.append((spec, channels, explanations.count))
            }
            explanations.append(explanation)
        }

        // Overrides, never for the control group: every matching ban, then the newest
        // matching force of an eligible action; each spares its control share.
        var effects: [DecisionV1.OverrideEffect] = []
        var forced: Int?
        if !control {
            let matching = store.activeOverrides(nowMs: now).filter {
                $0.matches(segments: facts.segments, context: request.context, segmentsKnown: person.profileKnown)
            }
            func effect(_ o: DecisionV1.Override) -> Bool {
                var effect = DecisionV1.OverrideEffect()
                effect.overrideId = o.id
                effect.applied = holdout.position(of: unit, scope: "override:\(o.id)") >= holdout.overrideControlShare
                effects.append(effect)
                return effect.applied
            }
            for o in matching where o.kind == "ban" {
                guard let k = eligible.firstIndex(where: { $0.spec.id == o.actionId }), effect(o) else { continue }
                explanations[eligible[k].slot].eligible = false
                explanations[eligible[k].slot].excludedBy = "\(Self.banPrefix)\(o.id) (\(o.reason))"
                eligible.remove(at: k)
            }
            if let o = matching.last(where: { o in o.kind == "force" && eligible.contains { $0.spec.id == o.actionId } }), effect(o) {
                forced = eligible.firstIndex { $0.spec.id == o.actionId }
            }
        }

        // Scores, and Thompson sampling's choice probabilities over the eligible actions.
        let learner = store.configuration
        var keys: [ArmKey] = []
        keys.reserveCapacity(2 * eligible.count)
        let segment = learner.segments.first { facts.segments.contains($0) }
        let placement = segment == nil && !eligible.isEmpty ? store.learnedPlacement(request.placement) : request.placement
        for (spec, _, _) in eligible {
            keys.append(.global(spec.id))
            keys.append(segment.map { .segment(spec.id, $0) } ?? .placement(spec.id, placement))
        }
        let arms = store.arms(keys, nowMs: now)
        var means: [Double] = []
        var sds: [Double] = []
        means.reserveCapacity(eligible.count)
        sds.reserveCapacity(eligible.count)
        for (k, (spec, _, slot)) in eligible.enumerated() {
            let prior = spec.action.priorResponseRate > 0 ? spec.action.priorResponseRate : learner.defaultPriorRate
            let estimate = Learner.estimate(global: arms[2 * k], context: arms[2 * k + 1], contextName: keys[2 * k + 1].context,
                                            priorRate: prior, configuration: learner)
            let scale = spec.action.value * spec.lever
            means.append(estimate.mean * scale)
            sds.append(estimate.sd * scale)
            explanations[slot].propensityEstimate = estimate.mean
            explanations[slot].score = estimate.mean * scale
            explanations[slot].arm = estimate.arm
            explanations[slot].successes = estimate.successes
            explanations[slot].failures = estimate.failures
        }
        let count = max(1, Int(request.count))
        func available(_ k: Int) -> Bool { usage.available(eligible[k].spec, among: eligible[k].channels, policy: policy) != nil }
        func take(_ k: Int) { usage.offer(eligible[k].spec, channel: usage.available(eligible[k].spec, among: eligible[k].channels, policy: policy)!) }
        var draws: [(index: Int, probability: Double)] = []
        if control {
            // The default experience: the rules_only policy, deterministic (propensity 1).
            let slots = DecisionPolicy.rulesOnly.ranking(explanations)
            for slot in slots where draws.count < count {
                let k = eligible.firstIndex { $0.slot == slot }!
                guard available(k) else { continue }
                draws.append((k, 1))
                take(k)
            }
            if let first = draws.first { explanations[eligible[first.index].slot].choiceProbability = 1 }
        } else {
            let probabilities = Learner.withFloor(Learner.winProbabilities(means: means, sds: sds), learner.explorationFloor)
            if let forced {
                for (k, (_, _, slot)) in eligible.enumerated() { explanations[slot].choiceProbability = k == forced ? 1 : 0 }
                draws.append((forced, 1))
                take(forced)
            } else {
                for (k, (_, _, slot)) in eligible.enumerated() { explanations[slot].choiceProbability = probabilities[k] }
            }
            // Caps are rechecked as the slate fills (a total cap of 3 with 2 used leaves one slot).
            draws += random.withLock { random in
                Learner.draw(probabilities, count: count - draws.count, using: &random,
                             allowed: { k in k != forced && available(k) }, chosen: take)
            }
        }
        // An answer short of `count`: the eligible actions left out are those whose caps the
        // slate itself filled (each had room when eligibility was judged).
        if draws.count < count {
            let drawn = Set(draws.map(\.index))
            for (k, (spec, channels, slot)) in eligible.enumerated() where !drawn.contains(k) {
                if let cap = usage.capExclusion(spec, among: channels, policy: policy) { explanations[slot].passedOverBy = cap }
            }
        }
        // A fallback channel is a possible contact: one the slate's earlier actions may fall
        // back to counts against its caps for the later ones (two fallbacks to a channel with
        // one contact left would be two contacts).
        var claimed: [CommonV1.Channel] = []
        let hasChannelCaps = policy.caps.contains { $0.scope == .channel }
        let ranked = draws.enumerated().map { rank, draw in
            var action = DecisionV1.RankedAction()
            action.actionId = eligible[draw.index].spec.id
            action.score = means[draw.index]
            action.propensity = draw.probability
            action.channel = usage.offered[rank].channel  // offers are appended in the order drawn
            // An action with no channels of its own, delivered, goes on the channel routing
            // picks: among those the contact policy's channel caps leave open, when it has any,
            // and that its consent purpose is not denied on (`purpose.channel`).
            let purpose = eligible[draw.index].spec.action.consentPurpose
            let channels = eligible[draw.index].channels.isEmpty && request.deliver && hasChannelCaps
                ? Channels.all.filter { purpose.isEmpty || facts.consent["\(purpose).\($0.ruleName)"] != false }
                : eligible[draw.index].channels
            action.fallbackChannels = channels.filter { channel in
                channel != action.channel && usage.belowChannelCaps(channel, policy: policy, plus: claimed.count { $0 == channel })
            }
            claimed += action.fallbackChannels
            return action
        }

        var record = DecisionV1.DecisionRecord()
        record.decisionId = Self.decisionID(now)
        record.personId = person.id ?? ""
        record.placement = request.placement
        record.context = request.context
        record.decidedAtMs = now
        record.modelVersion = "\(control ? "rules-only" : "thompson-v1")/catalog-\(catalogVersion)"
        record.degraded = !reasons.isEmpty
        record.degradedReasons = reasons
        record.holdout = control
        record.candidates = explanations
        record.actions = ranked
        record.catalogVersion = catalogVersion
        record.segments = facts.segments.sorted()
        record.heldOutActions = heldOut
        record.overrides = effects
        store.reserve(record)
        return record
    }

    enum Verdict {
        case eligible([CommonV1.Channel])
        case excluded(String)
    }

    /// Why `spec` may not be offered now, or the channels it may use, in this order:
    /// schedule, placement, consent, eligibility rule, suppressions, caps.
    func exclusion(_ spec: ActionSpec, request: DecisionV1.DecideRequest, person: Person, facts: Facts,
                   usage: CapUsage, policy: DecisionV1.ContactPolicy, now: Int64) -> Verdict {
        let action = spec.action
        if action.startsAtMs != 0, now < action.startsAtMs { return .excluded("schedule: starts at \(action.startsAtMs)") }
        if action.endsAtMs != 0, now >= action.endsAtMs { return .excluded("schedule: ended at \(action.endsAtMs)") }
        guard spec.offers(request.placement) else { return .excluded(spec.placementExclusion) }
        var channels = action.channels
        if !spec.consentPaths.isEmpty {
            // The refusal texts are the action's own when every path is unknown or every one
            // denied (built once); only a mix is put together here.
            var allowed: [CommonV1.Channel] = []
            var (denied, unknown) = (false, false)
            for consent in spec.consentPaths {
                switch person.profileKnown ? facts.consent[consent.path] : nil {
                case true?: allowed.append(consent.channel)
                case false?: denied = true
                case nil:
                    if action.safeWithoutConsent { allowed.append(consent.channel) } else { unknown = true }
                }
            }
            guard !allowed.isEmpty else {
                if !denied { return .excluded(spec.consentUnknownExclusion) }
                if !unknown { return .excluded(spec.consentDeniedExclusion) }
                return .excluded("consent: " + spec.consentPaths.map { facts.consent[$0.path] == false ? $0.denied : $0.unknown }
                    .joined(separator: "; "))
            }
            channels = channels.isEmpty ? [] : allowed
        }
        if let rule = spec.eligibility {
            if person.profileKnown {
                if !rule.evaluate(facts.lookup) { return .excluded(spec.eligibilityExclusion) }
            } else {
                // Without the profile only the request context is known: a rule whose answer
                // depends on the profile (`not segment.minors`) excludes, as unknown consent does.
                switch rule.evaluate(facts.lookup, unknown: { $0 != "context" }) {
                case true?: break
                case false?: return .excluded(spec.eligibilityExclusion)
                case nil: return .excluded(spec.eligibilityExclusion + " (unknown without the profile)")
                }
            }
        }
        if !usage.historyKnown, !action.suppressions.isEmpty { return .excluded("\(Self.suppressionPrefix)\(CapUsage.notChecked)") }
        for suppression in action.suppressions {
            let since = now - suppression.windowSeconds * 1000
            if usage.history.outcomes.contains(where: { $0.kind == suppression.outcome && $0.atMs > since && (suppression.anyAction || $0.action == spec.id) }) {
                let name = DecisionV1.Outcome.valueNames.first { $0.rawValue == suppression.outcome.rawValue }?.name ?? "\(suppression.outcome.rawValue)"
                return .excluded("\(Self.suppressionPrefix)\(name) on \(suppression.anyAction ? "any action" : "this action") within \(suppression.windowSeconds) s")
            }
        }
        if let reason = usage.capExclusion(spec, among: channels, policy: policy) { return .excluded(reason) }
        return .eligible(channels)
    }

    /// The holdout unit of a person the identity service could not resolve: the smallest of
    /// their identifiers, so that the same identifiers always land in the same group.
    static func unit(_ person: CommonV1.PersonRef?) -> String {
        guard case .identifiers(let list)? = person?.ref else { return "" }
        return "identifier:" + (list.identifiers.map { "\($0.type):\($0.value)" }.min() ?? "")
    }

    /// A time-ordered decision id: `d`, 12 hex digits of milliseconds, 16 random hex digits.
    static func decisionID(_ nowMs: Int64) -> String { TimeOrderedID.make(DecisionStore.decisionIDPrefix, nowMs: nowMs) }

    /// INVALID_ARGUMENT for a `decision_id` that no Decide can have given (not echoed back:
    /// it may be anything a client sent).
    static func checkDecisionID(_ id: String) throws {
        guard !id.isEmpty else { throw RPCError.invalidArgument(field: "decision_id", "is required") }
        guard TimeOrderedID.isWellFormed(id, prefix: DecisionStore.decisionIDPrefix) else {
            throw RPCError.invalidArgument(field: "decision_id", "is not a decision id (\"d\" and 28 hex digits, as Decide answers)")
        }
    }

    /// How a candidate banned by an override is explained (`override: banned by <id> (<reason>)`).
    static let banPrefix = "override: banned by "
    /// How the exclusions that past offers and outcomes bring about begin: a cap, a suppression.
    static let capPrefix = "cap: "
    static let suppressionPrefix = "suppression: "

    // MARK: - Outcomes

    func reportOutcome(_ request: DecisionV1.ReportOutcomeRequest) async throws -> DecisionV1.ReportOutcomeResponse {
        guard !request.outcomeId.isEmpty, request.outcomeId.utf8.count <= 128 else {
            throw RPCError.invalidArgument(field: "outcome_id", "must be 1-128 bytes (it makes a replay harmless)")
        }
        try Self.checkDecisionID(request.decisionId)
        try Names.check(request.actionId, field: "action_id")
        guard (1...6).contains(request.outcome.rawValue) else {
            throw RPCError.invalidArgument(field: "outcome", "must be OUTCOME_IMPRESSION ... OUTCOME_UNSUBSCRIBE")
        }
        // Bounded as an action's value is: sums over outcomes (lift, policy evaluation) stay finite.
        guard request.value.isFinite, request.value >= 0, request.value <= ActionSpec.maxValue else {
            throw RPCError.invalidArgument(field: "value", "must be a number from 0 to 1e12, got \(request.value)")
        }
        // A time ahead of this service's clock (a client's clock, up to a day) is taken as now:
        // learned at a future time, the arms' evidence would weigh less at every read before it.
        let now = clock()
        let at = min(try ClientTime.read(request.occurredAtMs, field: "occurred_at_ms", now: now), now)
        // A decision older than the latest is read from the file: not on the event loop.
        let id = request.decisionId
        var found = store.recentlyOffered(id)
        if found == nil { found = try await withTaskExecutorPreference(globalConcurrentExecutor) { try store.offered(id) } }
        guard var offered = found else {
            throw RPCError(.notFound, "decision_id: no decision \"\(request.decisionId)\"")
        }
        if offered.arms[request.actionId] == nil, request.outcome == .conversion,
           try await withTaskExecutorPreference(globalConcurrentExecutor, operation: { try store.decision(id) })?
               .candidates.contains(where: { $0.actionId == request.actionId && Self.inActionScope($0) }) == true {
            // A conversion on an action the decision did not offer but had in its lift scope
            // (eligible, banned, or excluded only by a cap or a suppression the treatment
            // filled): the person bought it unprompted. Taken, and it teaches nothing, as one
            // on an action held out. LiftReport counts it on the treated side as it counts a
            // held-out person's on control; refused, the treated side missed the conversions
            // its control counts.
            offered.arms[request.actionId] = []
        }
        guard offered.arms[request.actionId] != nil else {
            throw RPCError.invalidArgument(field: "action_id",
                "decision \(request.decisionId) did not offer or hold out \"\(request.actionId)\" (a conversion may also name an action it found eligible)")
        }
        // An outcome cannot precede its decision; a client's clock may be off by up to the
        // tolerance `ClientTime` allows ahead. (A time in seconds, not milliseconds, lands here.)
        guard at >= offered.decidedAtMs - ClientTime.maxAheadMs else {
            throw RPCError.invalidArgument(field: "occurred_at_ms",
                "\(at) is more than a day before decision \(request.decisionId) was made (\(offered.decidedAtMs); Unix milliseconds)")
        }
        var response = DecisionV1.ReportOutcomeResponse()
        response.duplicate = try await !store.report(request, offered: offered, atMs: at)
        return response
    }
}

/// What rules can read in one decision: `trait.`, `feature.`, `segment.`, `consent.` and `context.`.
struct Facts {
    var traits: [String: RuleValue] = [:]
    var features: [String: Double] = [:]
    var segments: Set<String> = []
    /// `purpose.channel` → granted, by the governing record (`governingConsent`: the newer of
    /// the channel's and the purpose's for every channel); `purpose` → the latter's.
    var consent: [String: Bool] = [:]
    var context: [String: String]

    init(profile: ProfileV1.ProfileView?, context: [String: String]) {
        self.context = context
        guard let profile else { return }
        for trait in profile.traits { traits[trait.name] = RuleValue(trait.value) }
        for feature in profile.features { features[feature.name] = feature.value }
        segments = Set(profile.segments)
        let general = profile.consent.filter { $0.channel == .unspecified }
        for record in profile.consent {
            let channel = record.channel.ruleName
            guard !channel.isEmpty else { consent[record.purpose] = record.granted; continue }
            let governing = governingConsent(exact: record, general: general.first { $0.purpose == record.purpose }, atMs: \.atMs)
            consent["\(record.purpose).\(channel)"] = governing?.granted
        }
        // The purpose's record for every channel also answers for channels without one of their own.
        for record in general {
            for channel in CommonV1.Channel.delivery {
                let path = "\(record.purpose).\(channel.ruleName)"
                if consent[path] == nil { consent[path] = record.granted }
            }
        }
    }

    func lookup(_ namespace: String, _ name: String) -> RuleValue? {
        switch namespace {
        case "trait": return traits[name]
        case "feature": return features[name].map { .number($0) }
        case "segment": return .bool(segments.contains(name))
        case "consent": return consent[name].map { .bool($0) }
        case "context": return context[name].map { .string($0) }
        default: return nil
        }
    }
}

/// A person's offers within the caps' windows, and those added while a slate fills.
struct CapUsage {
    let history: DecisionStore.History
    let now: Int64
    /// False when who the person is could not be found out (the identity service failed):
    /// their offers and outcomes are unknown, so no cap or suppression can be shown to hold,
    /// and every action one applies to is left out, as unknown consent leaves actions out.
    let historyKnown: Bool
    var offered: [(action: String, channel: CommonV1.Channel)] = []

    /// The exclusion's words when `historyKnown` is false.
    static let notChecked = "not checked: who the person is is unknown (the identity service did not answer)"

    init(history: DecisionStore.History, now: Int64, historyKnown: Bool = true) {
        self.history = history
        self.now = now
        self.historyKnown = historyKnown
    }

    func count(windowSeconds: Int64, _ matches: (String, Int32) -> Bool) -> Int {
        let since = now - windowSeconds * 1000
        return history.offers.count { $0.atMs > since && matches($0.action, $0.channel) }
            + offered.count { matches($0.action, $0.channel.rawValue) }
    }

    /// The cap (on the action, or the policy's per-action and total caps) that excludes `spec`.
    func capReason(_ spec: ActionSpec, policy: DecisionV1.ContactPolicy) -> String? {
        if !historyKnown, !spec.action.caps.isEmpty || policy.caps.contains(where: { $0.scope == .action || $0.scope == .total }) {
            return "\(DecisionService.capPrefix)\(Self.notChecked)"
        }
        for cap in spec.action.caps where count(windowSeconds: cap.windowSeconds, { a, _ in a == spec.id }) >= cap.max {
            return "\(DecisionService.capPrefix)at most \(cap.max) offers of this action per \(cap.windowSeconds) s"
        }
        for cap in policy.caps {
            switch cap.scope {
            case .action where count(windowSeconds: cap.windowSeconds, { a, _ in a == spec.id }) >= cap.max:
                return "\(DecisionService.capPrefix)contact policy, at most \(cap.max) offers of each action per \(cap.windowSeconds) s"
            case .total where count(windowSeconds: cap.windowSeconds, { _, _ in true }) >= cap.max:
                return "\(DecisionService.capPrefix)contact policy, at most \(cap.max) offers per \(cap.windowSeconds) s"
            default: continue
            }
        }
        return nil
    }

    /// The cap that keeps `spec` from being offered now on any of `channels`, in words.
    func capExclusion(_ spec: ActionSpec, among channels: [CommonV1.Channel], policy: DecisionV1.ContactPolicy) -> String? {
        if let reason = capReason(spec, policy: policy) { return reason }
        guard channel(among: channels, policy: policy) == nil else { return nil }
        if !historyKnown { return "\(DecisionService.capPrefix)\(Self.notChecked) (the channels' caps)" }
        return "\(DecisionService.capPrefix)every channel of the action is at its cap (\(channels.map(\.ruleName).joined(separator: ", ")))"
    }

    /// The channel `spec` would be offered on now: nil when a cap excludes it.
    func available(_ spec: ActionSpec, among channels: [CommonV1.Channel], policy: DecisionV1.ContactPolicy) -> CommonV1.Channel? {
        capReason(spec, policy: policy) == nil ? channel(among: channels, policy: policy) : nil
    }

    /// The first of `channels` below every channel cap (`.unspecified` for an action without
    /// channels), or nil when none is.
    func channel(among channels: [CommonV1.Channel], policy: DecisionV1.ContactPolicy) -> CommonV1.Channel? {
        guard !channels.isEmpty else { return .unspecified }
        return channels.first { belowChannelCaps($0, policy: policy) }
    }

    /// Whether `channel` is below every channel cap of the policy, with `plus` more contacts on it.
    func belowChannelCaps(_ channel: CommonV1.Channel, policy: DecisionV1.ContactPolicy, plus: Int = 0) -> Bool {
        policy.caps.allSatisfy { cap in
            cap.scope != .channel || cap.channel != channel
                || historyKnown && count(windowSeconds: cap.windowSeconds, { _, c in c == channel.rawValue }) + plus < cap.max
        }
    }

    mutating func offer(_ spec: ActionSpec, channel: CommonV1.Channel) {
        offered.append((spec.id, channel))
    }
}

/// A mutex a copyable value can hold (`Mutex` itself cannot be copied).
final class Exclusive<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    init(_ value: Value) { mutex = Mutex(value) }
    func withLock<Result, Failure: Error>(_ body: (inout sending Value) throws(Failure) -> sending Result) throws(Failure) -> sending Result {
        try mutex.withLock(body)
    }
}

/// Where Decide's time goes, through swift-metrics (exported by the admin port's /metrics):
/// - `decision_decide_stage_seconds{stage}`: `peers` (identity and profile calls, within
///   `peerTimeoutMs`), `choose` (eligibility, caps, scoring, the draw; with a wait for the
///   person's lock, and a history read from the file when memory does not reach back far
///   enough) and `log` (waiting for the log's transaction and writing it), a histogram each
/// - `decision_decisions_total{degraded}`: logged decisions, degraded ("true") or not
/// - `decision_decides_replayed_total`: Decides answered again from the log by request id
/// Delivery (`deliver`) comes after and is not in these.
struct DecideMetrics: Sendable {
    let peers = Timer(label: "decision_decide_stage_seconds", dimensions: [("stage", "peers")], preferredDisplayUnit: .seconds)
    let choose = Timer(label: "decision_decide_stage_seconds", dimensions: [("stage", "choose")], preferredDisplayUnit: .seconds)
    let log = Timer(label: "decision_decide_stage_seconds", dimensions: [("stage", "log")], preferredDisplayUnit: .seconds)
    let complete = Counter(label: "decision_decisions_total", dimensions: [("degraded", "false")])
    let degraded = Counter(label: "decision_decisions_total", dimensions: [("degraded", "true")])
    /// Decides answered from the log by their request id.
    let replayed = Counter(label: "decision_decides_replayed_total")
}
