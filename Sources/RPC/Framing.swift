import NIOCore

/// The 10-byte ttrpc frame header, as containerd/ttrpc writes it: payload length
/// (u32 big-endian, header excluded), stream id (u32 big-endian), type, flags.
public struct FrameHeader: Hashable, Sendable {
    public static let size = 10

    /// Frame types.
    public struct Kind: RawRepresentable, Hashable, Sendable {
        public var rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        public static let request = Kind(rawValue: 1)
        public static let response = Kind(rawValue: 2)
        /// Stream data (ttrpc 1.2 streaming); accepted and ignored.
        public static let data = Kind(rawValue: 3)
    }

    public var length: UInt32
    public var streamID: UInt32
    public var kind: Kind
    public var flags: UInt8

    public init(length: UInt32, streamID: UInt32, kind: Kind, flags: UInt8 = 0) {
        self.length = length
        self.streamID = streamID
        self.kind = kind
        self.flags = flags
    }
}

/// What the frame decoder emits.
public enum InboundFrame: Sendable, Hashable {
    /// A complete frame within the size limit.
    case frame(FrameHeader, ByteBuffer)
    /// A frame whose declared length exceeds the limit. Its body is skipped as it
    /// arrives, never buffered; the receiver answers RESOURCE_EXHAUSTED for its stream.
    case oversize(FrameHeader)
}

/// A frame to write.
public struct OutboundFrame: Sendable, Hashable {
    public var streamID: UInt32
    public var kind: FrameHeader.Kind
    public var payload: [UInt8]

    public init(streamID: UInt32, kind: FrameHeader.Kind, payload: [UInt8]) {
        self.streamID = streamID
        self.kind = kind
        self.payload = payload
    }
}

/// Fired (as a user inbound event) by `TTRPCFrameDecoder` when it begins holding part of a
/// frame (`pending` true) and when it no longer does: a server times how long a frame takes.
public struct FramePending: Sendable, Hashable {
    public var pending: Bool
}

/// A header that cannot be ttrpc: the connection is closed.
public struct FramingError: Error, Hashable, Sendable, CustomStringConvertible {
    public var description: String
}

/// Splits a byte stream into ttrpc frames. Frames longer than `maxPayloadSize`
/// are reported as `.oversize` and their bodies discarded as they arrive.
/// A header with an unknown type (not 1, 2 or 3) is garbage: decoding fails and
/// the connection is closed.
public struct TTRPCFrameDecoder: ByteToMessageDecoder {
    public typealias InboundOut = InboundFrame

    public let maxPayloadSize: Int
    private var bytesToSkip = 0
    private var pending = false

    public init(maxPayloadSize: Int) {
        self.maxPayloadSize = maxPayloadSize
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        if bytesToSkip > 0 {
            let n = min(bytesToSkip, buffer.readableBytes)
            buffer.moveReaderIndex(forwardBy: n)
            bytesToSkip -= n
            return bytesToSkip == 0 ? .continue : waiting(context, buffer)
        }
        guard buffer.readableBytes >= FrameHeader.size,
              let length = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self),
              let streamID = buffer.getInteger(at: buffer.readerIndex + 4, as: UInt32.self),
              let type = buffer.getInteger(at: buffer.readerIndex + 8, as: UInt8.self),
              let flags = buffer.getInteger(at: buffer.readerIndex + 9, as: UInt8.self)
        else { return waiting(context, buffer) }
        guard (1...3).contains(type) else {
            throw FramingError(description: "frame type \(type) is not a ttrpc frame type (1 request, 2 response, 3 data)")
        }
        let header = FrameHeader(length: length, streamID: streamID, kind: .init(rawValue: type), flags: flags)
        if Int(length) > maxPayloadSize {
            buffer.moveReaderIndex(forwardBy: FrameHeader.size)
            bytesToSkip = Int(length)
            context.fireChannelRead(Self.wrapInboundOut(.oversize(header)))
            return .continue
        }
        guard buffer.readableBytes >= FrameHeader.size + Int(length) else { return waiting(context, buffer) }
        buffer.moveReaderIndex(forwardBy: FrameHeader.size)
        let payload = buffer.readSlice(length: Int(length))!
        context.fireChannelRead(Self.wrapInboundOut(.frame(header, payload)))
        return .continue
    }

    /// `.needMoreData`, telling the pipeline (`FramePending`) when part of a frame starts or
    /// stops waiting here.
    private mutating func waiting(_ context: ChannelHandlerContext, _ buffer: ByteBuffer) -> DecodingState {
        let now = buffer.readableBytes > 0 || bytesToSkip > 0
        if now != pending {
            pending = now
            context.fireUserInboundEventTriggered(FramePending(pending: now))
        }
        return .needMoreData
    }

    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        // A partial frame at EOF is dropped: the peer went away mid-frame (or half-closed).
        // No frame waits any more: the frame timer must not close the connection, whose
        // answers still in flight go out.
        buffer.moveReaderIndex(to: buffer.writerIndex)
        bytesToSkip = 0
        return waiting(context, buffer)
    }
}

/// Writes ttrpc frames.
public struct TTRPCFrameEncoder: MessageToByteEncoder {
    public typealias OutboundIn = OutboundFrame

    public init() {}

    public func encode(data: OutboundFrame, out: inout ByteBuffer) throws {
        out.reserveCapacity(FrameHeader.size + data.payload.count)
        out.writeInteger(UInt32(data.payload.count))
        out.writeInteger(data.streamID)
        out.writeInteger(data.kind.rawValue)
        out.writeInteger(UInt8(0))
        out.writeBytes(data.payload)
    }
}
