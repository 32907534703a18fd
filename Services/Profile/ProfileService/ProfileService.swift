import Contracts
import Foundation
import RPC
import Rules

/// The profile service's settings (the `profile` section of `--config`). Defaults per field.
public struct ProfileConfiguration: Sendable, Codable, Equatable {
    /// Persons whose feature state Track keeps in memory before a flush writes them to the
    /// state file together, beside Track (with twice as many dirty before it ends, Track
    /// waits for it). More is fewer, denser writes for more memory (about 1 KiB a person with
    /// ten features) and a longer recomputation after a crash (up to twice this many persons
    /// from their events: about 9 s for 100,000 persons with 550,000 events on a 2-core
    /// machine). Default 50,000.
    public var stateFlushPersons = 50_000
    /// Persons whose feature state stays in memory after it was written (a clean copy), so
    /// their next event or GetProfile does not read it from the file. About 1 KiB a
    /// person with ten features; 0 keeps none. Default 100,000.
    public var stateCachePersons = 100_000
    /// At most this many bytes of clean states (estimated per person from its features'
    /// buckets, distinct values and texts): a few persons with thousands of distinct values
    /// fill it sooner than `stateCachePersons`. Default 536870912 (512 MiB).
    public var stateCacheBytes = 512 << 20
    /// Persons whose traits and current consent stay in memory (the latest written or read),
    /// so that GetProfile reads no file for them. About 0.5 KB a person with a trait and a
    /// consent record (RSS 33 → 81 MiB with 100,000 such persons loaded); 0 keeps none.
    /// Default 100,000.
    public var factsCachePersons = 100_000
    /// At most this many bytes of traits and consent in memory (estimated from their texts):
    /// persons with a thousand long traits each fill it sooner than `factsCachePersons`.
    /// Default 268435456 (256 MiB).
    public var factsCacheBytes = 256 << 20

    public init() {}

    /// Missing keys keep their defaults; a value out of range stops the service at start.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        stateFlushPersons = try c.decodeIfPresent(Int.self, forKey: .stateFlushPersons) ?? Self().stateFlushPersons
        guard (1...10_000_000).contains(stateFlushPersons) else {
            throw DecodingError.dataCorruptedError(forKey: .stateFlushPersons, in: c,
                                                   debugDescription: "stateFlushPersons must be between 1 and 10000000, got \(stateFlushPersons)")
        }
        stateCachePersons = try c.decodeIfPresent(Int.self, forKey: .stateCachePersons) ?? Self().stateCachePersons
        guard (0...100_000_000).contains(stateCachePersons) else {
            throw DecodingError.dataCorruptedError(forKey: .stateCachePersons, in: c,
                                                   debugDescription: "stateCachePersons must be between 0 and 100000000, got \(stateCachePersons)")
        }
        factsCachePersons = try c.decodeIfPresent(Int.self, forKey: .factsCachePersons) ?? Self().factsCachePersons
        guard (0...100_000_000).contains(factsCachePersons) else {
            throw DecodingError.dataCorruptedError(forKey: .factsCachePersons, in: c,
                                                   debugDescription: "factsCachePersons must be between 0 and 100000000, got \(factsCachePersons)")
        }
        for (key, value) in [(CodingKeys.stateCacheBytes, \Self.stateCacheBytes), (.factsCacheBytes, \Self.factsCacheBytes)] {
            self[keyPath: value] = try c.decodeIfPresent(Int.self, forKey: key) ?? Self()[keyPath: value]
            guard (0...(1 << 40)).contains(self[keyPath: value]) else {
                throw DecodingError.dataCorruptedError(forKey: key, in: c,
                                                       debugDescription: "\(key.stringValue) must be between 0 and \(1 << 40), got \(self[keyPath: value])")
            }
        }
    }
}

/// arbiter.profile.v1.Profile over a `ProfileStore`: validates every request
/// (INVALID_ARGUMENT naming the field) and resolves identifiers through the identity
/// service when a request names a person by identifiers.
public struct ProfileService: RPCService {
    public let store: ProfileStore
    let identity: RPCClient?
    let clock: @Sendable () -> Int64

    /// Most events in one Track.
    public static let maxEvents = 1000
    /// Most properties on an event, traits in one SetTraits, consents in one SetConsent.
    public static let maxFields = 100

    public init(store: ProfileStore, identity: RPCClient? = nil,
                clock: @escaping @Sendable () -> Int64 = { Int64(Date().timeIntervalSince1970 * 1000) }) {
        self.store = store
        self.identity = identity
        self.clock = clock
    }

    public func register(in router: inout RPCRouter) {
        let methods = ProfileV1.Profile.self
        router.register(methods.track) { request, _ in try await track(request) }
        router.register(methods.setTraits) { request, _ in try await setTraits(request) }
        router.register(methods.defineFeature) { request, _ in try defineFeature(request) }
        router.register(methods.listFeatures) { _, _ in
            var response = ProfileV1.ListFeaturesResponse()
            response.features = store.features.map(\.definition)
            return response
        }
        router.register(methods.defineSegment) { request, _ in try defineSegment(request) }
        router.register(methods.setConsent) { request, _ in try await setConsent(request) }
        router.register(methods.getConsent) { request, _ in try await getConsent(request) }
        // Most profiles are answered from memory: no hop to the pool and back (the profile
        // service's handlers otherwise run on the pool, as they read and write files).
        router.register(methods.getProfile, execution: .eventLoop) { request, _ in try await getProfile(request) }
        router.register(methods.erase) { request, _ in try erase(request) }
    }

    // MARK: - Persons

    /// The person a reference names without asking the identity service: its person id,
    /// or nil when it names identifiers.
    static func localPerson(_ ref: CommonV1.PersonRef?, field: String) throws(RPCError) -> String? {
        switch ref?.ref {
        case .personId(let id)?: return try Names.personID(id, field: "\(field).person_id")
        case .identifiers?: return nil
        case nil: throw .invalidArgument(field: field, "is required (person_id or identifiers)")
        }
    }

    /// The canonical person a `PersonRef` names: its person id, or its identifiers resolved
    /// (and created when new and `create`) by the identity service.
    func resolve(_ ref: CommonV1.PersonRef?, field: String, create: Bool) async throws -> String? {
        if let local = try Self.localPerson(ref, field: field) { return local }
        guard case .identifiers(let list)? = ref?.ref, !list.identifiers.isEmpty else {
            throw RPCError.invalidArgument(field: "\(field).identifiers", "is empty")
        }
        guard let identity else {
            throw RPCError(.failedPrecondition, "\(field).identifiers: this profile service has no identity service (--identity); send person_id")
        }
        var request = IdentityV1.ResolveRequest()
        request.identifiers = list.identifiers
        request.createIfMissing = create
        // (A `catch where` on this typed-throws call crashes Swift 6.3.1's SIL optimizer.)
        do {
            let response = try await identity.call(IdentityV1.Identity.resolve, request)
            return response.personId.isEmpty ? nil : response.personId
        } catch {
            guard error.code == .invalidArgument else { throw error }
            throw RPCError(.invalidArgument, "\(field).\(error.message)")
        }
    }

    /// The person `ref` names, created when its identifiers are new.
    func createdPerson(_ ref: CommonV1.PersonRef?, field: String) async throws -> String {
        guard let person = try await resolve(ref, field: field, create: true) else {
            // The identity service answers no person when every identifier is a blocked value.
            throw RPCError.invalidArgument(field: "\(field).identifiers", "every identifier is a blocked value; none can name a person")
        }
        return person
    }

    func existingPerson(_ ref: CommonV1.PersonRef?) async throws -> String {
        guard let person = try await resolve(ref, field: "person", create: false) else {
            throw RPCError(.notFound, "person: no person has these identifiers")
        }
        return person
    }

    /// `person` as the identity feed left it: the person it was merged into, or NOT_FOUND
    /// when it was erased (no new data is kept for it).
    func living(_ person: String, field: String = "person") throws(RPCError) -> String {
        guard let current = store.current(person) else { throw Self.erased(person, field: field) }
        return current
    }

    static func erased(_ person: String, field: String = "person") -> RPCError {
        RPCError(.notFound, "\(field): person \(person) was erased")
    }

    /// Track's answer for one event it did not store.
    static func rejection(_ index: Int, _ eventID: String, _ error: RPCError) -> ProfileV1.EventRejection {
        var rejection = ProfileV1.EventRejection()
        rejection.index = UInt32(index)
        rejection.eventId = eventID
        rejection.reason = error.message
        return rejection
    }

    static func source(_ source: String, field: String = "source") throws(RPCError) -> String {
        guard source.utf8.count <= 128 else { throw .invalidArgument(field: field, "is longer than 128 bytes") }
        return source.isEmpty ? "unspecified" : source
    }

    /// Named values (event properties, traits): names valid and unique, values set and finite.
    static func fields(_ fields: [CommonV1.Field], field: String) throws(RPCError) -> [(name: String, value: RuleValue)] {
        guard fields.count <= maxFields else { throw .invalidArgument(field: field, "at most \(maxFields), got \(fields.count)") }
        var seen = Set<String>()
        var result: [(String, RuleValue)] = []
        for (i, f) in fields.enumerated() {
            try Names.check(f.name, field: "\(field)[\(i)].name")
            guard seen.insert(f.name).inserted else { throw .invalidArgument(field: "\(field)[\(i)].name", "\"\(f.name)\" appears twice") }
            guard let value = RuleValue(f.value) else { throw .invalidArgument(field: "\(field)[\(i)].value", "is required") }
            if case .number(let n) = value, !n.isFinite { throw .invalidArgument(field: "\(field)[\(i)].value", "must be finite") }
            if case .string(let s) = value, s.utf8.count > 1024 {
                throw .invalidArgument(field: "\(field)[\(i)].value", "is longer than 1024 bytes")
            }
            result.append((f.name, value))
        }
        return result
    }

    // MARK: - Methods

    func track(_ request: ProfileV1.TrackRequest) async throws -> ProfileV1.TrackResponse {
        guard !request.events.isEmpty else { throw RPCError.invalidArgument(field: "events", "is empty") }
        guard request.events.count <= Self.maxEvents else {
            throw RPCError.invalidArgument(field: "events", "at most \(Self.maxEvents) events per request, got \(request.events.count)")
        }
        let now = clock()
        var response = ProfileV1.TrackResponse()
        // Each event is checked before any person is resolved: identifiers are resolved (and
        // new persons created) only for events that will be stored.
        var valid: [(index: Int, event: TrackedEvent)] = []
        for (i, event) in request.events.enumerated() {
            do {
                valid.append((i, try validated(event, person: "", now: now)))
            } catch {
                response.rejections.append(Self.rejection(i, event.eventId, error))
            }
        }
        let persons = try await resolveAll(Set(valid.map { request.events[$0.index].person }))
        var accepted: [(index: Int, event: TrackedEvent)] = []
        for (i, event) in valid {
            do {
                // A person merged away keeps its id here: the store files the event under the
                // survivor with this id as its origin, which an unmerge takes it back by.
                var event = event
                event.personID = try persons[request.events[i].person]!.get()
                _ = try living(event.personID)
                accepted.append((i, event))
            } catch {  // INVALID_ARGUMENT from resolving its person, or NOT_FOUND (erased): this event only
                response.rejections.append(Self.rejection(i, request.events[i].eventId, error))
            }
        }
        guard !accepted.isEmpty else {
            response.rejections.sort { $0.index < $1.index }
            return response
        }
        let result = try await store.track(accepted.map(\.event), nowMs: now)
        for ((i, event), outcome) in zip(accepted, result.outcomes) {
            switch outcome {
            case .stored: response.accepted += 1
            case .duplicate: response.duplicates += 1
            case .personErased: response.rejections.append(Self.rejection(i, event.eventID, Self.erased(event.personID)))
            }
        }
        response.rejections.sort { $0.index < $1.index }
        return response
    }

    /// Resolves each distinct reference once, a few at a time concurrently. A reference the
    /// identity service calls invalid fails alone (its events are rejected); any other
    /// failure (the identity service unavailable) fails the whole request.
    func resolveAll(_ refs: Set<CommonV1.PersonRef?>) async throws -> [CommonV1.PersonRef?: Result<String, RPCError>] {
        try await withThrowingTaskGroup(of: (CommonV1.PersonRef?, Result<String, RPCError>).self) { group in
            var results: [CommonV1.PersonRef?: Result<String, RPCError>] = [:]
            var remote: [CommonV1.PersonRef?] = []
            for ref in refs {
                // A person id (or a missing person) needs no call: checked here, without a task.
                do throws(RPCError) {
                    guard let local = try Self.localPerson(ref, field: "person") else { remote.append(ref); continue }
                    results[ref] = .success(local)
                } catch {
                    results[ref] = .failure(error)
                }
            }
            var pending = remote.makeIterator()
            func addNext() -> Bool {
                guard let ref = pending.next() else { return false }
                group.addTask {
                    do {
                        return (ref, .success(try await createdPerson(ref, field: "person")))
                    } catch let error as RPCError where error.code == .invalidArgument {
                        return (ref, .failure(error))
                    }
                }
                return true
            }
            for _ in 0..<16 { guard addNext() else { break } }
            while let (ref, result) = try await group.next() {
                results[ref] = result
                _ = addNext()
            }
            return results
        }
    }

    /// The largest magnitude of an event's value or numeric property: SUM and DECAYED_SUM over
    /// any number of them stay finite (1e308 twice was infinity, and then NaN).
    static let maxEventNumber = 1e15

    func validated(_ event: ProfileV1.Event, person: String, now: Int64) throws(RPCError) -> TrackedEvent {
        guard !event.eventId.isEmpty else { throw .invalidArgument(field: "event_id", "is required (it makes a replay harmless)") }
        guard event.eventId.utf8.count <= 128 else { throw .invalidArgument(field: "event_id", "is longer than 128 bytes") }
        try Names.check(event.type, field: "type")
        guard event.value.isFinite, abs(event.value) <= Self.maxEventNumber else {
            throw .invalidArgument(field: "value", "must be a finite number within ±1e15, got \(event.value)")
        }
        let properties = try Self.fields(event.properties, field: "properties")
        for (i, property) in properties.enumerated() {
            if case .number(let n) = property.value, abs(n) > Self.maxEventNumber {
                throw .invalidArgument(field: "properties[\(i)].value", "must be within ±1e15, got \(n)")
            }
        }
        return TrackedEvent(eventID: event.eventId, personID: person, type: event.type,
                            occurredAtMs: try ClientTime.read(event.occurredAtMs, field: "occurred_at_ms", now: now),
                            value: event.value, properties: Dictionary(properties.map { ($0.name, $0.value) }, uniquingKeysWith: { a, _ in a }))
    }

    func setTraits(_ request: ProfileV1.SetTraitsRequest) async throws -> ProfileV1.SetTraitsResponse {
        let traits = try Self.fields(request.traits, field: "traits")
        guard !traits.isEmpty else { throw RPCError.invalidArgument(field: "traits", "is empty") }
        let source = try Self.source(request.source)
        // A time ahead of this service's clock (a client's, up to a day) is taken as now: a
        // value dated tomorrow would otherwise make every newer value stale until then.
        let now = clock()
        let at = min(try ClientTime.read(request.updatedAtMs, field: "updated_at_ms", now: now), now)
        // Given for a person merged away: kept with its id as their origin (as events are),
        // which an unmerge gives them back by and its erasure finds them by.
        let given = try await createdPerson(request.person, field: "person")
        let person = try living(given)
        var response = ProfileV1.SetTraitsResponse()
        response.personId = person
        response.stale = try store.setTraits(person: person, origin: given == person ? "" : given, traits, source: source, updatedAtMs: at)
        return response
    }

    func defineFeature(_ request: ProfileV1.DefineFeatureRequest) throws -> ProfileV1.FeatureDefinition {
        guard let definition = request.feature else { throw RPCError.invalidArgument(field: "feature", "is required") }
        _ = try FeatureSpec.parseFilter(definition.filter, kinds: Rule.standardKind)  // as written: its kinds checked too
        return try store.define(definition, backfill: request.backfill, nowMs: clock()).definition
    }

    func defineSegment(_ request: ProfileV1.DefineSegmentRequest) throws -> ProfileV1.SegmentDefinition {
        guard let segment = request.segment else { throw RPCError.invalidArgument(field: "segment", "is required") }
        try Names.check(segment.name, field: "segment.name")
        let features = Set(store.features.map(\.name))
        let rule: Rule
        do {
            rule = try Rule(segment.rule, check: { namespace, name in
                switch namespace {
                case "trait", "consent": return nil
                case "feature": return features.contains(name) ? nil : "feature \"\(name)\" is not defined"
                default: return "unknown namespace \"\(namespace)\" (a segment reads trait., feature. and consent.)"
                }
            }, kinds: Rule.standardKind)
        } catch {
            throw RPCError.invalidArgument(field: "segment.rule", error.description)
        }
        try store.defineSegment(name: segment.name, rule: rule, nowMs: clock())
        return segment
    }

    func setConsent(_ request: ProfileV1.SetConsentRequest) async throws -> ProfileV1.SetConsentResponse {
        guard !request.consents.isEmpty else { throw RPCError.invalidArgument(field: "consents", "is empty") }
        guard request.consents.count <= Self.maxFields else {
            throw RPCError.invalidArgument(field: "consents", "at most \(Self.maxFields), got \(request.consents.count)")
        }
        let now = clock()
        var records: [ProfileStore.Consent] = []
        for (i, c) in request.consents.enumerated() {
            try Names.checkPurpose(c.purpose, field: "consents[\(i)].purpose")
            guard (0...5).contains(c.channel.rawValue) else {
                throw RPCError.invalidArgument(field: "consents[\(i)].channel", "unknown channel \(c.channel.rawValue)")
            }
            records.append(ProfileStore.Consent(purpose: c.purpose, channel: c.channel.rawValue, granted: c.granted,
                                                source: try Self.source(c.source, field: "consents[\(i)].source"),
                                                atMs: min(try ClientTime.read(c.atMs, field: "consents[\(i)].at_ms", now: now), now)))  // as for traits
        }
        let given = try await createdPerson(request.person, field: "person")  // as in setTraits
        let person = try living(given)
        try store.setConsent(person: person, origin: given == person ? "" : given, records)
        var response = ProfileV1.SetConsentResponse()
        response.personId = person
        return response
    }

    func getConsent(_ request: ProfileV1.GetConsentRequest) async throws -> ProfileV1.GetConsentResponse {
        guard request.historyLimit <= 10_000 else {
            throw RPCError.invalidArgument(field: "history_limit", "at most 10000, got \(request.historyLimit)")
        }
        let person = try living(try await existingPerson(request.person))
        var response = ProfileV1.GetConsentResponse()
        response.personId = person
        if request.includeHistory {
            let (current, history, truncated) = try store.consent(person: person, historyLimit: request.historyLimit == 0 ? 1000 : Int(request.historyLimit))
            response.current = current.map(Self.wire)
            response.history = history.map(Self.wire)
            response.historyTruncated = truncated
        } else {
            response.current = try store.currentConsent(person: person).map(Self.wire)
        }
        return response
    }

    static let profileFields: Set<String> = ["traits", "features", "segments", "consent"]

    func getProfile(_ request: ProfileV1.GetProfileRequest) async throws -> ProfileV1.ProfileView {
        for (i, name) in request.fields.enumerated() where !Self.profileFields.contains(name) {
            throw RPCError.invalidArgument(field: "fields[\(i)]", "unknown field \"\(name)\" (traits, features, segments, consent)")
        }
        let wanted = request.fields.isEmpty ? Self.profileFields : Set(request.fields)
        let person = try living(try await existingPerson(request.person))
        let now = clock()
        // On the event loop when memory holds the whole profile; the files are read off it.
        let found: ProfileStore.Profile?
        switch store.profileInMemory(person: person, nowMs: now) {
        case .answered(let profile): found = profile
        case .readFiles:
            found = try await withTaskExecutorPreference(globalConcurrentExecutor) { try store.profile(person: person, nowMs: now) }
        }
        guard let profile = found else {
            throw RPCError(.notFound, "person: no profile for \(person)")
        }
        var view = ProfileV1.ProfileView()
        view.personId = person
        view.firstSeenMs = profile.firstSeenMs
        view.lastSeenMs = profile.lastSeenMs
        if wanted.contains("traits") {
            view.traits = profile.traits.map {
                var trait = ProfileV1.Trait()
                trait.name = $0.name
                trait.value = CommonV1.Value($0.value)
                trait.source = $0.source
                trait.updatedAtMs = $0.updatedAtMs
                trait.ageSeconds = max(0, (now - $0.updatedAtMs) / 1000)
                return trait
            }
        }
        if wanted.contains("features") {
            view.features = profile.features.map {
                var feature = ProfileV1.FeatureValue()
                feature.name = $0.name
                feature.value = $0.value
                return feature
            }
        }
        if wanted.contains("segments") { view.segments = profile.segments }
        if wanted.contains("consent") { view.consent = profile.consent.map(Self.wire) }
        return view
    }

    func erase(_ request: ProfileV1.EraseRequest) throws -> ProfileV1.EraseResponse {
        let erased = try store.erase(person: try Names.personID(request.personId, field: "person_id"), nowMs: clock())
        var response = ProfileV1.EraseResponse()
        response.eventsRemoved = UInt32(erased.events)
        response.traitsRemoved = UInt32(erased.traits)
        response.consentsRemoved = UInt32(erased.consents)
        response.personId = erased.person
        return response
    }

    static func wire(_ consent: ProfileStore.Consent) -> ProfileV1.ConsentRecord {
        var record = ProfileV1.ConsentRecord()
        record.purpose = consent.purpose
        record.channel = CommonV1.Channel(rawValue: consent.channel)
        record.granted = consent.granted
        record.source = consent.source
        record.atMs = consent.atMs
        return record
    }
}
