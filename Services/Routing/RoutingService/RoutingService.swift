import Contracts
import Crypto
import Foundation
import Logging
import NIOCore
import RPC
import Rules
import ServiceLifecycle
import Storage

/// arbiter.routing.v1.Routing: plans deliveries (consent, reachability, learned channel
/// preference, quiet hours and send time, caps), keeps them in a durable outbox that the
/// `Dispatcher` drains, and learns from delivery events.
///
/// Route reads the person's traits and consent from the profile service; without an
/// answer from it nothing is routed (UNAVAILABLE): consent is never guessed.
public struct RoutingService: RPCService {
    public let store: RoutingStore
    let configuration: RoutingConfiguration
    let profile: RPCClient?
    let adapters: Adapters
    let logger: Logger
    let clock: @Sendable () -> Int64

    public static let maxVariables = 100
    public static let maxVariableBytes = 16 << 10

    public init(store: RoutingStore, configuration: RoutingConfiguration, profile: RPCClient?, group: any EventLoopGroup,
                logger: Logger, clock: @escaping @Sendable () -> Int64 = { Int64(Date().timeIntervalSince1970 * 1000) }) throws {
        self.store = store
        self.configuration = configuration
        self.profile = profile
        self.adapters = try Adapters(configuration: configuration, group: group)
        self.logger = logger
        self.clock = clock
    }

    /// The background work: the dispatcher, the outbox's pruner with `outboxRetentionDays`
    /// and, with a profile service, the consent revoker;
    /// the adapters' connections are closed after the dispatcher stopped.
    public var background: [any Service] {
        var services: [any Service] = [AdapterLifetime(adapters: adapters), Dispatcher(store: store, adapters: adapters, configuration: configuration, profile: profile, logger: logger, clock: clock)]
        if let profile { services.append(ConsentRevoker(store: store, profile: profile, logger: logger)) }
        if configuration.outboxRetentionDays > 0 {
            services.append(store.pruner(retentionDays: configuration.outboxRetentionDays, logger: logger, clock: clock))
        }
        return services
    }

    /// Closes the adapters' connections (the HTTP client must be shut down before it is
    /// released). Call once, after the dispatcher stopped, when not running `background`.
    public func shutdown() async { await adapters.shutdown() }

    /// The dispatcher alone (tests drive it directly).
    public var dispatcher: Dispatcher { Dispatcher(store: store, adapters: adapters, configuration: configuration, profile: profile, logger: logger, clock: clock) }

    public func register(in router: inout RPCRouter) {
        let methods = RoutingV1.Routing.self
        router.register(methods.route) { request, _ in try await route(request) }
        router.register(methods.reportDeliveryEvent) { request, _ in try await report(request) }
        router.register(methods.getDelivery) { request, _ in try getDelivery(request) }
        router.register(methods.listDeliveries) { request, _ in try listDeliveries(request) }
        router.register(methods.retryDeadLetter) { request, _ in try retryDeadLetter(request) }
    }

    func getDelivery(_ request: RoutingV1.GetDeliveryRequest) throws -> RoutingV1.Delivery {
        try Names.check(request.deliveryId, field: "delivery_id")
        guard let delivery = try store.delivery(request.deliveryId) else {
            throw RPCError(.notFound, "delivery_id: no delivery \"\(request.deliveryId)\"")
        }
        return delivery
    }

    func listDeliveries(_ request: RoutingV1.ListDeliveriesRequest) throws -> RoutingV1.ListDeliveriesResponse {
        guard [0, 1, 3, 4, 5].contains(request.state.rawValue) else {
            throw RPCError.invalidArgument(field: "state", "must be a delivery state other than STATE_SENDING (reserved), got \(request.state.rawValue)")
        }
        let state = request.state.rawValue == 0 ? nil : request.state
        let person: String?
        if request.personId.isEmpty && state == .deadLetter {
            person = nil
        } else if request.personId.isEmpty {
            throw RPCError.invalidArgument(field: "person_id", "is required unless state is STATE_DEAD_LETTER")
        } else {
            person = try Names.personID(request.personId, field: "person_id")
        }
        guard request.limit <= 1000 else { throw RPCError.invalidArgument(field: "limit", "at most 1000, got \(request.limit)") }
        guard request.pageToken.isEmpty || TimeOrderedID.isWellFormed(request.pageToken, prefix: "dl") else {
            throw RPCError.invalidArgument(field: "page_token", "is not a next_page_token of ListDeliveries")
        }
        let (deliveries, more) = try store.deliveries(person: person, state: state, before: request.pageToken.isEmpty ? nil : request.pageToken,
                                                      limit: request.limit == 0 ? 50 : Int(request.limit))
        var response = RoutingV1.ListDeliveriesResponse()
        response.deliveries = deliveries
        if more, let last = deliveries.last { response.nextPageToken = last.deliveryId }
        return response
    }

    func retryDeadLetter(_ request: RoutingV1.RetryDeadLetterRequest) throws -> RoutingV1.Delivery {
        try Names.check(request.deliveryId, field: "delivery_id")
        guard let before = try store.delivery(request.deliveryId) else {
            throw RPCError(.notFound, "delivery_id: no delivery \"\(request.deliveryId)\"")
        }
        guard before.state == .deadLetter, let delivery = try store.requeue(request.deliveryId, atMs: clock()), delivery.state == .scheduled else {
            throw RPCError(.failedPrecondition, "delivery_id: \(request.deliveryId) is not a dead letter")
        }
        return delivery
    }

    // MARK: - Route

    /// 3000-01-01T00:00:00Z: the latest `not_before_ms` or `not_after_ms` a Route may name.
    static let latestMs: Int64 = 32_503_680_000_000

    static func validate(_ request: RoutingV1.RouteRequest) throws(RPCError) {
        switch request.person?.ref {
        case .personId(let id)?: _ = try Names.personID(id, field: "person.person_id")
        case .identifiers(let list)?:
            guard !list.identifiers.isEmpty else { throw .invalidArgument(field: "person.identifiers", "is empty") }
        case nil: throw .invalidArgument(field: "person", "is required (person_id or identifiers)")
        }
        guard let message = request.message else { throw .invalidArgument(field: "message", "is required") }
        try Names.check(message.templateId, field: "message.template_id")
        guard message.variables.count <= maxVariables else {
            throw .invalidArgument(field: "message.variables", "at most \(maxVariables), got \(message.variables.count)")
        }
        for (name, value) in message.variables {
            try Names.check(name, field: "message.variables key")
            guard value.utf8.count <= maxVariableBytes else { throw .invalidArgument(field: "message.variables[\(name)]", "is longer than \(maxVariableBytes) bytes") }
        }
        for (i, channel) in request.allowedChannels.enumerated() {
            guard Planner.allChannels.contains(channel) else {
                throw .invalidArgument(field: "allowed_channels[\(i)]", "unknown channel \(channel.rawValue)")
            }
            guard !request.allowedChannels[..<i].contains(channel) else {
                throw .invalidArgument(field: "allowed_channels[\(i)]", "\(channel.ruleName) is listed twice")
            }
        }
        guard request.urgency == .normal || request.urgency == .critical else {
            throw .invalidArgument(field: "urgency", "unknown urgency \(request.urgency.rawValue)")
        }
        try Names.checkKey(request.idempotencyKey, field: "idempotency_key")
        try Names.checkPurpose(request.purpose, field: "purpose")  // one SetConsent records (opt-outs are passed on)
        // Before the year 3000: the planner adds the send window to these (Int64.max overflowed).
        guard (0..<Self.latestMs).contains(request.notBeforeMs) else {
            throw .invalidArgument(field: "not_before_ms", "must be a Unix time in milliseconds before the year 3000, got \(request.notBeforeMs)")
        }
        guard (0..<Self.latestMs).contains(request.notAfterMs) else {
            throw .invalidArgument(field: "not_after_ms", "must be a Unix time in milliseconds before the year 3000, got \(request.notAfterMs)")
        }
        if request.notAfterMs > 0 {
            guard request.notAfterMs >= request.notBeforeMs else {
                throw .invalidArgument(field: "not_after_ms", "is before not_before_ms")
            }
            guard request.notAfterMs - request.notBeforeMs <= 31 * 86_400_000 || request.notBeforeMs == 0 else {
                throw .invalidArgument(field: "not_after_ms", "the window may span at most 31 days")
            }
        }
    }

    /// SHA-256 of everything a Route request asks for, map order aside: a reused
    /// idempotency key with a different request is refused.
    static func requestHash(_ request: RoutingV1.RouteRequest) -> Data {
        var text = ""
        switch request.person?.ref {
        case .personId(let id)?: text += "p\(id)\n"
        case .identifiers(let list)?: text += list.identifiers.map { "i\($0.type)=\($0.value)\n" }.joined()
        case nil: break
        }
        let variables = request.message?.variables ?? [:]
        text += "t\(request.message?.templateId ?? "")\n" + variables.keys.sorted().map { "v\($0)=\(variables[$0]!.utf8.count):\(variables[$0]!)\n" }.joined()
        text += "c\(request.allowedChannels.map { String($0.rawValue) }.joined(separator: ","))\nu\(request.urgency.rawValue)\n"
        text += "b\(request.notBeforeMs)\na\(request.notAfterMs)\nr\(request.purpose)\n"
        return Data(SHA256.hash(data: Data(text.utf8)))
    }

    func route(_ request: RoutingV1.RouteRequest) async throws -> RoutingV1.Delivery {
        try Self.validate(request)
        let hash = Self.requestHash(request)
        func answer(_ delivery: RoutingV1.Delivery, sameRequest: Bool) throws -> RoutingV1.Delivery {
            guard sameRequest else {
                throw RPCError(.alreadyExists, "idempotency_key: \"\(request.idempotencyKey)\" was used for a different request (delivery \(delivery.deliveryId))")
            }
            return delivery
        }
        // A known key is found when the delivery is stored, so the common case (a new key)
        // reads the store once; a replay is answered without the profile service only
        // when that service cannot answer.
        func replay() throws -> RoutingV1.Delivery? {
            try store.delivery(idempotencyKey: request.idempotencyKey).map { try answer($0.0, sameRequest: $0.1 == hash) }
        }
        guard let profile else {
            if let delivery = try replay() { return delivery }
            throw RPCError(.unavailable, "profile: not configured (--profile); consent cannot be checked, nothing is routed")
        }
        var profileRequest = ProfileV1.GetProfileRequest()
        profileRequest.person = request.person
        profileRequest.fields = ["traits", "consent"]
        let view: ProfileV1.ProfileView
        do {
            view = try await profile.call(ProfileV1.Profile.getProfile, profileRequest, timeout: .milliseconds(configuration.profileTimeoutMs))
        } catch {
            if let delivery = try replay() { return delivery }
            if error.code == .notFound { throw RPCError(.notFound, "person: unknown to the profile service (\(error.message))") }
            if error.code == .invalidArgument { throw RPCError(.invalidArgument, error.message) }
            throw RPCError(.unavailable, "profile: \(error.code) \(error.message); consent cannot be checked, nothing is routed")
        }
        let now = clock()
        let planner = Planner(configuration: configuration, adapters: adapters.channels)
        switch try await store.insert(person: view.personId, idempotencyKey: request.idempotencyKey, requestHash: hash, nowMs: now, plan: { person, population in
            planner.plan(request, profile: view, person: person, population: population, now: now)
        }) {
        case .stored(let delivery): return delivery
        case .existing(let delivery, let same): return try answer(delivery, sameRequest: same)
        case .personErased: throw RPCError(.notFound, "person: person \(view.personId) was erased")
        }
    }

    // MARK: - Delivery events

    func report(_ request: RoutingV1.ReportDeliveryEventRequest) async throws -> RoutingV1.Delivery {
        try Names.check(request.deliveryId, field: "delivery_id")
        guard (1...6).contains(request.kind.rawValue) else {
            throw RPCError.invalidArgument(field: "kind", "must be DELIVERED, OPENED, CLICKED, BOUNCED, COMPLAINED or UNSUBSCRIBED, got \(request.kind.rawValue)")
        }
        guard !request.hardBounce || request.kind == .bounced else {
            throw RPCError.invalidArgument(field: "hard_bounce", "applies to BOUNCED only")
        }
        let channel: CommonV1.Channel? = request.channel == .unspecified ? nil : request.channel
        if let channel, !Planner.allChannels.contains(channel) {
            throw RPCError.invalidArgument(field: "channel", "unknown channel \(channel.rawValue)")
        }
        let now = clock()
        let at = try ClientTime.read(request.occurredAtMs, field: "occurred_at_ms", now: now)
        guard let (delivery, optOut) = try store.report(request.deliveryId, kind: request.kind, hardBounce: request.hardBounce,
                                                        channel: channel, atMs: at, nowMs: now) else {
            throw RPCError(.notFound, "delivery_id: no delivery \"\(request.deliveryId)\"")
        }
        if let optOut, let profile {
            // Best effort now; the ConsentRevoker retries until the profile service confirms.
            _ = await ConsentRevoker.revoke(optOut, profile: profile, store: store, logger: logger)
        }
        return delivery
    }
}
