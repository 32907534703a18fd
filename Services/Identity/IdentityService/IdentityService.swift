import Contracts
import Foundation
import RPC
import Rules

/// arbiter.identity.v1.Identity over an `IdentityStore`: validates every request
/// (INVALID_ARGUMENT naming the field) and maps store errors to status codes.
public struct IdentityService: RPCService {
    public let store: IdentityStore
    let clock: @Sendable () -> Int64

    /// Most identifiers in one request.
    public static let maxIdentifiers = 100
    /// The most a ListChanges page holds, encoded (tests set less).
    var changesPageBytes = AnswerSize.listBudget

    public init(store: IdentityStore, clock: @escaping @Sendable () -> Int64 = { Int64(Date().timeIntervalSince1970 * 1000) }) {
        self.store = store
        self.clock = clock
    }

    public func register(in router: inout RPCRouter) {
        let methods = IdentityV1.Identity.self
        router.register(methods.resolve) { request, _ in try await resolve(request) }
        router.register(methods.link) { request, _ in try await link(request) }
        router.register(methods.unmerge) { request, _ in try await unmerge(request) }
        router.register(methods.getPerson) { request, _ in try await getPerson(request) }
        router.register(methods.history) { request, _ in try await history(request) }
        router.register(methods.listChanges) { request, _ in try await listChanges(request) }
        router.register(methods.erase) { request, _ in try await erase(request) }
    }

    // MARK: - Validation

    /// Normalizes `identifiers`; blocked values are dropped (never used to link). Errors name
    /// `field[i]`, or `field` where the request has a single identifier (`indexed` false).
    func normalized(_ identifiers: [CommonV1.Identifier], field: String = "identifiers", indexed: Bool = true) throws(RPCError)
        -> (usable: [NormalizedIdentifier], blocked: [NormalizedIdentifier]) {
        guard !identifiers.isEmpty else { throw .invalidArgument(field: field, "at least one identifier is required") }
        guard identifiers.count <= Self.maxIdentifiers else {
            throw .invalidArgument(field: field, "at most \(Self.maxIdentifiers) identifiers per request, got \(identifiers.count)")
        }
        var usable: [NormalizedIdentifier] = [], blocked: [NormalizedIdentifier] = []
        for (i, id) in identifiers.enumerated() {
            let name = indexed ? "\(field)[\(i)]" : field
            switch store.normalizer.normalize(type: id.type, value: id.value) {
            case .success(let n): if !usable.contains(n) { usable.append(n) }
            case .failure(.blocked(let type, let value)): blocked.append(NormalizedIdentifier(type: type, value: value))
            case .failure(.unknownType(let type)):
                throw .invalidArgument(field: "\(name).type",
                    "unknown identifier type \"\(type)\" (known: \(store.normalizer.rules.allTypes.joined(separator: ", ")))")
            case .failure(.invalid(let type, _, let reason)):
                throw .invalidArgument(field: "\(name).value", "\(type) \(reason)")
            }
        }
        return (usable, blocked)
    }

    static func personID(_ id: String, field: String = "person_id") throws(RPCError) -> String {
        let trimmed = id.trimmingCharacters(in: .whitespaces)
        guard !trimmed.isEmpty else { throw .invalidArgument(field: field, "is required") }
        guard trimmed.utf8.count <= 64 else { throw .invalidArgument(field: field, "is longer than 64 bytes") }
        return trimmed
    }

    func mapped<T>(_ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch let error as IdentityStore.StoreError {
            switch error {
            case .personNotFound(let id): throw RPCError(.notFound, "person_id: no person \(id)")
            case .personErased(let id): throw RPCError(.notFound, "person_id: person \(id) was erased")
            case .identifierNotFound(let type): throw RPCError(.notFound, "identifier: no such \(type) identifier on that person")
            case .mergeNotFound(let id): throw RPCError(.notFound, "merge_id: no merge \(id) into that person")
            case .invalid(let message): throw RPCError(.invalidArgument, message)
            case .precondition(let message): throw RPCError(.failedPrecondition, message)
            }
        }
    }

    static func source(_ source: String) throws(RPCError) -> String {
        guard source.utf8.count <= 128 else { throw .invalidArgument(field: "source", "is longer than 128 bytes") }
        return source.isEmpty ? "unspecified" : source
    }

    // MARK: - Methods

    func resolve(_ request: IdentityV1.ResolveRequest) async throws -> IdentityV1.ResolveResponse {
        let (ids, blocked) = try normalized(request.identifiers)
        var response = IdentityV1.ResolveResponse()
        guard !ids.isEmpty else {
            // Only blocked values: nothing to resolve, and no person can be made of them.
            guard request.createIfMissing else { return response }
            throw RPCError.invalidArgument(field: "identifiers",
                "every identifier is blocked (\(blocked.map { "\($0.type) \"\($0.value)\"" }.joined(separator: ", "))); no person can be created from them")
        }
        let result = try await mapped { try await store.resolve(ids, create: request.createIfMissing, source: "resolve", nowMs: clock()) }
        response.personId = result.personID ?? ""
        response.created = result.created
        response.matched = result.matched.map(Self.wire)
        return response
    }

    func link(_ request: IdentityV1.LinkRequest) async throws -> IdentityV1.LinkResponse {
        let (ids, blocked) = try normalized(request.identifiers)
        guard !ids.isEmpty else {
            throw RPCError.invalidArgument(field: "identifiers",
                "every identifier is blocked (\(blocked.map { "\($0.type) \"\($0.value)\"" }.joined(separator: ", "))) and cannot link")
        }
        let source = try Self.source(request.source)
        let at = try ClientTime.read(request.observedAtMs, field: "observed_at_ms", now: clock())
        let result = try await mapped { try await store.link(ids, source: source, observedAtMs: at) }
        var response = IdentityV1.LinkResponse()
        response.personId = result.personID
        response.mergedPersonIds = result.mergedPersonIDs
        response.conflicts = result.conflicts.map {
            var conflict = IdentityV1.MergeConflict()
            conflict.rule = $0.rule
            conflict.identifierType = $0.identifierType
            conflict.personIds = $0.personIDs
            return conflict
        }
        return response
    }

    func unmerge(_ request: IdentityV1.UnmergeRequest) async throws -> IdentityV1.UnmergeResponse {
        let person = try Self.personID(request.personId)
        guard request.identifiers.isEmpty != (request.mergeId == 0) else {
            throw RPCError.invalidArgument(field: "identifiers", "give either identifiers to detach or a merge_id, not both or neither")
        }
        guard request.mergeId >= 0 else { throw RPCError.invalidArgument(field: "merge_id", "must be positive") }
        let ids = request.identifiers.isEmpty ? [] : try normalized(request.identifiers).usable
        guard request.reason.utf8.count <= 512 else { throw RPCError.invalidArgument(field: "reason", "is longer than 512 bytes") }
        let reason = request.reason.isEmpty ? "unmerge" : request.reason
        let (survivor, split) = try await mapped {
            try await store.unmerge(personID: person, identifiers: ids, mergeID: request.mergeId == 0 ? nil : request.mergeId,
                                    reason: reason, nowMs: clock())
        }
        var response = IdentityV1.UnmergeResponse()
        // The person split from: given a merged-away id (even the one split off), its survivor.
        response.personId = survivor
        response.newPersonId = split
        return response
    }

    /// The largest `page_size` of GetPerson.
    static let maxPersonPage = 10_000

    func getPerson(_ request: IdentityV1.GetPersonRequest) async throws -> IdentityV1.Person {
        let id = try Self.personID(request.personId)
        guard request.pageSize <= Self.maxPersonPage else {
            throw RPCError.invalidArgument(field: "page_size", "must be at most \(Self.maxPersonPage), got \(request.pageSize)")
        }
        let pageSize = request.pageSize == 0 ? 1000 : Int(request.pageSize)
        let after = try request.pageToken.isEmpty ? nil : Self.identifierCursor(request.pageToken)
        // One more than the page, to tell whether more follow.
        let record = try await mapped { try await store.person(id, after: after, limit: pageSize + 1) }
        var person = IdentityV1.Person()
        person.personId = record.id
        person.createdAtMs = record.createdAtMs
        let wires = record.identifiers.prefix(pageSize).map {
            var entry = IdentityV1.PersonIdentifier()
            var identifier = CommonV1.Identifier()
            identifier.type = $0.type
            identifier.value = $0.value
            entry.identifier = identifier
            entry.firstSeenMs = $0.firstSeenMs
            entry.lastSeenMs = $0.lastSeenMs
            entry.source = $0.source
            return entry
        }
        // A page also stops at the answer budget (never empty: a pager always moves on).
        let count = AnswerSize.fitting(wires.lazy.map { $0.serializedBytes().count })
        person.identifiers = Array(wires.prefix(count))
        if count < record.identifiers.count, let last = record.identifiers.prefix(count).last {
            person.nextPageToken = Self.identifierToken(type: last.type, value: last.value)
        }
        return person
    }

    /// GetPerson's page token: the last identifier of the page (type and stored value), in
    /// base64 (opaque to clients).
    static func identifierToken(type: String, value: String) -> String {
        Data((type + "\n" + value).utf8).base64EncodedString()
    }

    static func identifierCursor(_ token: String) throws(RPCError) -> (type: String, value: String) {
        guard token.utf8.count <= 4096, let data = Data(base64Encoded: token), let text = String(data: data, encoding: .utf8),
              let newline = text.firstIndex(of: "\n") else {
            throw .invalidArgument(field: "page_token", "is not a token this service gave")
        }
        return (String(text[..<newline]), String(text[text.index(after: newline)...]))
    }

    func history(_ request: IdentityV1.HistoryRequest) async throws -> IdentityV1.HistoryResponse {
        let id = try Self.personID(request.personId)
        guard request.limit <= 10_000 else { throw RPCError.invalidArgument(field: "limit", "must be at most 10000, got \(request.limit)") }
        let limit = request.limit == 0 ? 1000 : Int(request.limit)
        let (entries, truncated) = try await mapped { try await store.history(id, limit: limit) }
        var response = IdentityV1.HistoryResponse()
        // The last recorded, oldest first, as many as fit in `changesPageBytes` (a conflict
        // may list 100 persons and its cause): an answer stays within a message.
        let wires = entries.map(Self.wire)
        let fit = AnswerSize.fitting(wires.reversed().lazy.map { $0.serializedBytes().count }, maxBytes: changesPageBytes)
        response.entries = Array(wires.suffix(fit))
        response.truncated = truncated || fit < wires.count
        return response
    }

    func listChanges(_ request: IdentityV1.ListChangesRequest) async throws -> IdentityV1.ListChangesResponse {
        guard request.limit <= 1000 else { throw RPCError.invalidArgument(field: "limit", "must be at most 1000, got \(request.limit)") }
        guard request.afterSeq <= UInt64(Int64.max) else { throw RPCError.invalidArgument(field: "after_seq", "is too large") }
        let limit = request.limit == 0 ? 100 : Int(request.limit)
        let changes = try await store.changes(after: Int64(request.afterSeq), limit: limit)
        // A page also stops at `changesPageBytes` (never empty): an erasure lists every person
        // it absorbed, so a page of them could outgrow a message, and a follower that asks
        // again for the same page would stop for good.
        let wires = changes.map(Self.wire)
        var response = IdentityV1.ListChangesResponse()
        response.changes = Array(wires.prefix(AnswerSize.fitting(wires.lazy.map { $0.serializedBytes().count }, maxBytes: changesPageBytes)))
        response.nextAfterSeq = response.changes.last?.seq ?? request.afterSeq
        return response
    }

    func erase(_ request: IdentityV1.EraseRequest) async throws -> IdentityV1.EraseResponse {
        let now = clock()
        let result: (seq: Int64, removed: Int)
        switch request.target {
        case .personId(let id)?:
            let person = try Self.personID(id)
            result = try await mapped { try await store.erase(personID: person, nowMs: now) }
        case .identifier(let identifier)?:
            let (ids, blocked) = try normalized([identifier], field: "identifier", indexed: false)
            guard let id = ids.first ?? blocked.first else { throw RPCError.invalidArgument(field: "identifier", "is required") }
            result = try await mapped { try await store.erase(identifier: id, nowMs: now) }
        case nil:
            throw RPCError.invalidArgument(field: "target", "set person_id or identifier")
        }
        var response = IdentityV1.EraseResponse()
        response.changeSeq = UInt64(result.seq)
        response.identifiersRemoved = UInt32(result.removed)
        return response
    }

    static func wire(_ id: NormalizedIdentifier) -> CommonV1.Identifier {
        var identifier = CommonV1.Identifier()
        identifier.type = id.type
        identifier.value = id.value
        return identifier
    }

    static func wire(_ change: IdentityStore.ChangeRecord) -> IdentityV1.Change {
        var wire = IdentityV1.Change()
        wire.seq = UInt64(change.seq)
        wire.kind = IdentityV1.Change.Kind(rawValue: Int32(change.kind.rawValue))
        wire.targetPersonId = change.target
        wire.sourcePersonIds = change.sources
        wire.cause = change.cause
        wire.atMs = change.atMs
        wire.mergeId = change.mergeID
        wire.identifierOnly = change.kind == .erase && change.cause != IdentityStore.personErasedCause
        return wire
    }
}
