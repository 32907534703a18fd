import ArgumentParser
import Foundation

/// The `--config` JSON file: `{"identity": {...}, "profile": {...}, ...}`.
enum ConfigFile {
    /// The section decoded as `T`, nil when the file has no such section.
    static func decode<T: Decodable>(_ section: String, from data: [UInt8], as type: T.Type) throws -> T? {
        let object: Any
        do {
            object = try JSONSerialization.jsonObject(with: Data(data))
        } catch {
            throw ValidationError("--config: not valid JSON: \(error.localizedDescription)")
        }
        guard let root = object as? [String: Any] else { throw ValidationError("--config: the top level must be an object") }
        guard let part = root[section] else { return nil }
        do {
            return try JSONDecoder().decode(T.self, from: JSONSerialization.data(withJSONObject: part))
        } catch let DecodingError.typeMismatch(_, context), let DecodingError.valueNotFound(_, context) {
            let path = ([section] + context.codingPath.map(\.stringValue)).joined(separator: ".")
            throw ValidationError("--config: \(path): \(context.debugDescription)")
        } catch {
            throw ValidationError("--config: \(section): \(error)")
        }
    }
}
