import Contracts
import Foundation
import Testing

@Suite("JSON mapping (arbiter call)")
struct ProtoJSONTests {
    func json(_ text: String) throws -> Any { try JSONSerialization.jsonObject(with: Data(text.utf8)) }

    @Test("JSON → protobuf: nested messages, oneofs, repeated enums by name, maps, int64 as string or number")
    func encode() throws {
        let bytes = try ProtoJSON.encode(try json("""
            {"person": {"identifiers": {"identifiers": [{"type": "email", "value": "ada@example.com"}]}},
             "message": {"templateId": "welcome", "variables": {"subject": "Hi", "body": "é"}},
             "allowedChannels": ["CHANNEL_PUSH", 1], "urgency": "URGENCY_CRITICAL", "idempotency_key": "k-1",
             "notBeforeMs": "1780308000000", "notAfterMs": 1780311600000, "purpose": "marketing"}
            """), as: RoutingV1.Routing.route.inputDescriptor)
        let request = try RoutingV1.RouteRequest(serializedBytes: bytes)
        guard case .identifiers(let list)? = request.person?.ref else { Issue.record("person.identifiers lost"); return }
        #expect(list.identifiers.map(\.value) == ["ada@example.com"])
        #expect(request.message?.templateId == "welcome" && request.message?.variables == ["subject": "Hi", "body": "é"])
        #expect(request.allowedChannels == [.push, .email] && request.urgency == .critical && request.idempotencyKey == "k-1")
        #expect(request.notBeforeMs == 1_780_308_000_000 && request.notAfterMs == 1_780_311_600_000 && request.purpose == "marketing")
    }

    @Test("protobuf → JSON: lowerCamelCase names, enums by name, int64 as strings, defaults left out")
    func decode() throws {
        var delivery = RoutingV1.Delivery()
        delivery.deliveryId = "dl1"
        delivery.state = .scheduled
        delivery.channel = .email
        delivery.sendAtMs = 1_780_308_000_000
        delivery.fallbackChannels = [.push, .sms]
        var event = RoutingV1.DeliveryEvent()
        event.kind = .sent
        event.detail = "ok"
        delivery.events = [event]
        var message = RoutingV1.Message()
        message.variables = ["a": "1"]
        delivery.message = message
        let object = try ProtoJSON.decode(delivery.serializedBytes(), as: RoutingV1.Routing.route.outputDescriptor)
        #expect(object["deliveryId"] as? String == "dl1" && object["state"] as? String == "STATE_SCHEDULED")
        #expect(object["channel"] as? String == "CHANNEL_EMAIL" && object["sendAtMs"] as? String == "1780308000000")
        #expect(object["fallbackChannels"] as? [String] == ["CHANNEL_PUSH", "CHANNEL_SMS"])
        #expect((object["events"] as? [[String: Any]])?.first?["kind"] as? String == "DELIVERY_EVENT_KIND_SENT")
        #expect((object["message"] as? [String: Any])?["variables"] as? [String: String] == ["a": "1"])
        #expect(object["attempts"] == nil && object["lastError"] == nil)
        // And back: the JSON encodes to the same message.
        let again = try RoutingV1.Delivery(serializedBytes: ProtoJSON.encode(object, as: RoutingV1.Routing.route.outputDescriptor))
        #expect(again == delivery)
    }

    @Test("a field that does not exist or a value of the wrong type is named", arguments: [
        (#"{"persn": {}}"#, "persn"), (#"{"urgency": "LOUD"}"#, "urgency"), (#"{"allowedChannels": "CHANNEL_EMAIL"}"#, "allowedChannels"),
        (#"{"notBeforeMs": 1.5}"#, "notBeforeMs"), (#"{"message": {"variables": {"a": 1}}}"#, "message.variables[a]"),
        (#"{"person": {"personId": 7}}"#, "person.personId"), (#"[]"#, "request"),
    ])
    func errors(_ text: String, _ field: String) throws {
        do {
            _ = try ProtoJSON.encode(try json(text), as: RoutingV1.Routing.route.inputDescriptor)
            Issue.record("accepted \(text)")
        } catch let error as ProtoJSONError {
            #expect(error.field == field, "\(error)")
        }
    }

    @Test("listing: fields with their types, maps as map<k, v>")
    func listing() {
        let fields = ProtoJSON.fields(of: RoutingV1.Routing.route.inputDescriptor)
        #expect(fields.map(\.name) == ["person", "message", "allowedChannels", "urgency", "idempotencyKey", "notBeforeMs", "notAfterMs", "purpose"])
        #expect(fields[2].repeated && fields[2].type == "arbiter.common.v1.Channel" && fields[5].type == "int64")
        let message = ProtoJSON.fields(of: RoutingV1.Routing.route.outputDescriptor).first { $0.name == "message" }
        #expect(message?.type == "arbiter.routing.v1.Message")
    }
}
