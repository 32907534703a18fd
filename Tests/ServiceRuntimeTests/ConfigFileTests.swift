import ArgumentParser
import Foundation
@testable import ServiceRuntime
import Testing

@Suite("--config sections")
struct ConfigFileTests {
    struct Section: Codable, Equatable {
        struct Inner: Codable, Equatable {
            var timeoutMs: Int?
        }
        var name: String?
        var inner: Inner?
        var limits: [String: Int]?
        var optional: String?
    }

    func decode(_ json: String) throws -> Section? {
        try ConfigFile.decode("service", from: Array(json.utf8), as: Section.self, sections: ["service", "other"])
    }

    func refusal(_ json: String) -> String {
        do {
            _ = try decode(json)
            return "accepted"
        } catch {
            return "\(error)"
        }
    }

    @Test("a known section decodes; keys may be left out or null; map keys are data, not settings")
    func decodes() throws {
        #expect(try decode("{}") == nil)
        let section = try decode(#"{"service": {"name": "x", "inner": {"timeoutMs": 7}, "limits": {"anything": 1}, "optional": null}}"#)
        #expect(section == Section(name: "x", inner: .init(timeoutMs: 7), limits: ["anything": 1], optional: nil))
    }

    @Test("unknown keys, at any depth, and sections that are not objects are refused by name")
    func refuses() {
        #expect(refusal(#"{"service": {"nmae": "x"}}"#) == "--config: service.nmae: unknown key")
        #expect(refusal(#"{"service": {"inner": {"timeout_ms": 7}}}"#) == "--config: service.inner.timeout_ms: unknown key")
        // Another service's section is that service's business; a misspelt one is nobody's.
        #expect(refusal(#"{"other": {"anything": 1}}"#) == "accepted")
        #expect(refusal(#"{"servce": {"name": "x"}}"#) == "--config: servce: unknown section (the sections are other, service)")
        #expect(refusal(#"{"Service": {}, "service": {}}"#) == "--config: Service: unknown section (the sections are other, service)")
        #expect(throws: ValidationError.self) {
            try ConfigFile.decode("identity", from: Array(#"{"identiy": {"privacy_key_file": "/k"}}"#.utf8), as: Section.self)
        }
        for value in ["null", "5", #""text""#, "[1]"] {
            #expect(refusal(#"{"service": \#(value)}"#) == "--config: service: must be an object", "\(value)")
        }
    }
}
