import Contracts
import Rules
import Testing

@Suite("protobuf-c codec")
struct CodecTests {
    static func richAction() -> DecisionV1.Action {
        var cap = DecisionV1.Cap()
        cap.scope = .action
        cap.max = 3
        cap.windowSeconds = 7 * 86_400
        var action = DecisionV1.Action()
        action.id = "spring-sale"
        action.name = "Spring sale — 20 % off ✓"
        action.placements = ["home", "checkout", ""]
        action.channels = [.email, .push, CommonV1.Channel(rawValue: 99)]
        action.value = 12.5
        action.lever = -0.25
        action.startsAtMs = -1
        action.endsAtMs = Int64.max
        action.eligibility = "trait.tier == \"gold\""
        action.caps = [cap, DecisionV1.Cap()]
        action.safeWithoutConsent = true
        action.version = UInt64.max
        return action
    }

    @Test("every field kind survives a round trip")
    func roundTrip() throws {
        let action = Self.richAction()
        let decoded = try DecisionV1.Action(serializedBytes: action.serializedBytes())
        #expect(decoded == action)

        var request = DecisionV1.DecideRequest()
        var ids = CommonV1.IdentifierList()
        var email = CommonV1.Identifier()
        email.type = "email"
        email.value = "ada@example.com"
        ids.identifiers = [email, email]
        request.person = CommonV1.PersonRef()
        request.person?.ref = .identifiers(ids)
        request.placement = "home"
        request.context = ["country": "NL", "device": "ios", "": "empty key"]
        request.count = 3
        request.explain = true
        #expect(try DecisionV1.DecideRequest(serializedBytes: request.serializedBytes()) == request)
    }

    @Test("a large message (more C memory than one arena chunk, strings longer than a chunk) survives a round trip")
    func largeRoundTrip() throws {
        var record = DecisionV1.DecisionRecord()
        record.decisionId = String(repeating: "d", count: 3 << 20)  // longer than the largest chunk (1 MiB)
        record.context = Dictionary(uniqueKeysWithValues: (0..<300).map { ("key\($0)", String(repeating: "v", count: $0)) })
        record.candidates = (0..<2000).map { i in
            var candidate = DecisionV1.CandidateExplanation()
            candidate.actionId = "action-\(i)"
            candidate.excludedBy = i % 3 == 0 ? "" : "eligibility: " + String(repeating: "x", count: i)
            candidate.score = Double(i) / 7
            return candidate
        }
        record.actions = [DecisionV1.RankedAction()]
        let bytes = record.serializedBytes()
        #expect(bytes.count > 4 << 20)
        #expect(try DecisionV1.DecisionRecord(serializedBytes: bytes) == record)
    }

    @Test("oneof members are distinguished, including empty values", arguments: [
        CommonV1.Value.OneOfKind.stringValue(""), .stringValue("x"), .numberValue(0), .numberValue(-2.5),
        .boolValue(false), .boolValue(true),
    ])
    func oneof(kind: CommonV1.Value.OneOfKind) throws {
        var value = CommonV1.Value()
        value.kind = kind
        let decoded = try CommonV1.Value(serializedBytes: value.serializedBytes())
        #expect(decoded.kind == kind)
        // An unset oneof stays unset.
        #expect(try CommonV1.Value(serializedBytes: CommonV1.Value().serializedBytes()).kind == nil)
    }

    @Test("the ttrpc envelope encodes to the bytes containerd's client sends")
    func envelopeBytes() throws {
        var request = TTRPC.Request()
        request.service = "grpc.health.v1.Health"
        request.method = "Check"
        request.timeoutNano = 1_000_000_000
        var kv = TTRPC.KeyValue()
        kv.key = "k"
        kv.value = "v"
        request.metadata = [kv]
        let expected: [UInt8] = [0x0a, 21] + Array("grpc.health.v1.Health".utf8)
            + [0x12, 5] + Array("Check".utf8)
            + [0x20, 0x80, 0x94, 0xeb, 0xdc, 0x03]  // timeout_nano = 1e9, varint
            + [0x2a, 6, 0x0a, 1, 0x6b, 0x12, 1, 0x76]
        #expect(request.serializedBytes() == expected)
        #expect(try TTRPC.Request(serializedBytes: expected) == request)

        // An OK response with an empty status, as containerd's server writes it.
        var response = TTRPC.Response()
        response.status = GoogleRPC.Status()
        response.payload = [0x08, 0x01]
        #expect(response.serializedBytes() == [0x0a, 0x00, 0x12, 0x02, 0x08, 0x01])
    }

    @Test("default values encode to nothing and decode from nothing")
    func defaults() throws {
        #expect(DecisionV1.Action().serializedBytes().isEmpty)
        #expect(try DecisionV1.Action(serializedBytes: []) == DecisionV1.Action())
    }

    @Test("unknown fields from a newer peer are skipped")
    func unknownFields() throws {
        // field 99 (varint 5) then field 1 = "x"
        let bytes: [UInt8] = [0x98, 0x06, 0x05, 0x0a, 0x01, 0x78]
        let request = try HealthV1.HealthCheckRequest(serializedBytes: bytes)
        #expect(request.service == "x")
    }

    @Test("malformed input throws an error naming the message", arguments: [
        [0x0a, 0x05, 0x61] as [UInt8],        // length past the end
        [0x0a],                               // tag without a value
        [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],  // overlong varint
        [0x07],                               // field 0, wire type 7
        [0x0a, 0x03, 0xff, 0xff, 0xff],       // sub-message (status) of garbage
    ])
    func malformed(bytes: [UInt8]) {
        #expect {
            _ = try TTRPC.Response(serializedBytes: bytes)
        } throws: { error in
            (error as? ProtoDecodingError)?.messageName == "ttrpc.Response"
        }
    }

    @Test("strings with a NUL character or invalid UTF-8 are rejected, naming the field")
    func stringValidation() throws {
        // service = "a\0b"
        #expect {
            _ = try TTRPC.Request(serializedBytes: [0x0a, 0x03, 0x61, 0x00, 0x62])
        } throws: { error in
            (error as? ProtoDecodingError)?.description == "invalid ttrpc.Request: field service contains a NUL character"
        }
        // metadata[0].value = "Bearer t\0x": nested, named by its path
        var kv = TTRPC.KeyValue()
        kv.key = "authorization"
        kv.value = "Bearer t"
        var request = TTRPC.Request()
        request.metadata = [kv]
        var bytes = request.serializedBytes()
        bytes[1] += 2
        bytes[3 + 15] += 2  // the KeyValue's value length
        bytes += [0x00, 0x78]
        #expect {
            _ = try TTRPC.Request(serializedBytes: bytes)
        } throws: { error in
            (error as? ProtoDecodingError)?.reason == "metadata.field value contains a NUL character"
        }
        #expect(throws: ProtoDecodingError.self) {
            _ = try HealthV1.HealthCheckRequest(serializedBytes: [0x0a, 0x02, 0xc3, 0x28])
        }
        // Valid multi-byte UTF-8 passes; bytes fields may hold anything.
        #expect(try HealthV1.HealthCheckRequest(serializedBytes: [0x0a, 0x02, 0xc3, 0xa9]).service == "é")
        var echo = EchoV1.EchoRequest()
        echo.blob = [0, 0xff, 0]
        #expect(try EchoV1.EchoRequest(serializedBytes: echo.serializedBytes()).blob == [0, 0xff, 0])
    }

    @Test("every truncation of a valid encoding either decodes or throws")
    func truncations() throws {
        let bytes = Self.richAction().serializedBytes()
        var failures = 0
        for length in 0..<bytes.count {
            do { _ = try DecisionV1.Action(serializedBytes: bytes[0..<length]) } catch { failures += 1 }
        }
        #expect(failures > bytes.count / 2)
    }

    @Test("random bytes never crash the decoder")
    func randomBytes() {
        var generator = SplitMix64(seed: 0xA5B1_7E55)
        var decoded = 0, rejected = 0
        for _ in 0..<20_000 {
            let count = Int(generator.next() % 64)
            let bytes = (0..<count).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
            do {
                let action = try DecisionV1.Action(serializedBytes: bytes)
                // Whatever decodes re-encodes and decodes to the same value.
                #expect(try DecisionV1.Action(serializedBytes: action.serializedBytes()) == action)
                decoded += 1
            } catch {
                rejected += 1
            }
        }
        #expect(decoded > 0 && rejected > 0)
    }

    @Test("enums keep unknown values and name known ones")
    func enums() {
        #expect(CommonV1.Channel.push.protoValueName == "CHANNEL_PUSH")
        #expect(CommonV1.Channel(rawValue: 42).protoValueName == "42")
        #expect(HealthV1.HealthCheckResponse.ServingStatus.protoName == "grpc.health.v1.HealthCheckResponse.ServingStatus")
    }

    @Test("method descriptors carry the names and idempotency of the .proto")
    func descriptors() {
        #expect(HealthV1.Health.check.fullName == "grpc.health.v1.Health/Check")
        #expect(HealthV1.Health.check.isIdempotent)
        #expect(HealthV1.Health.check.inputName == "grpc.health.v1.HealthCheckRequest")
    }
}
