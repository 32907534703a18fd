// Package rawttrpc speaks the ttrpc 1.1 framing directly over a net.Conn, so
// that a test can send frames the containerd client never produces (even
// stream ids, oversized length headers, unknown frame types, garbage
// envelopes) and look at the exact response frames.
//
// Frame: 10-byte header (u32 BE payload length, u32 BE stream id, u8 type,
// u8 flags) followed by the payload.
package rawttrpc

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/gogo/protobuf/proto"
)

const (
	HeaderLen    = 10
	TypeRequest  = 1
	TypeResponse = 2
	TypeData     = 3
	// MaxMessage is the default maximum payload length (4 MiB).
	MaxMessage = 4 << 20
)

// Frame is one decoded frame.
type Frame struct {
	Length   uint32
	StreamID uint32
	Type     uint8
	Flags    uint8
	Payload  []byte
}

// Conn is a raw ttrpc connection.
type Conn struct {
	net.Conn
}

// Dial opens a TCP connection.
func Dial(addr string, timeout time.Duration) (*Conn, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, err
	}
	return &Conn{Conn: c}, nil
}

// Header encodes a frame header.
func Header(length, streamID uint32, typ, flags uint8) []byte {
	h := make([]byte, HeaderLen)
	binary.BigEndian.PutUint32(h[0:4], length)
	binary.BigEndian.PutUint32(h[4:8], streamID)
	h[8] = typ
	h[9] = flags
	return h
}

// WriteFrame writes header (with the true payload length) and payload.
func (c *Conn) WriteFrame(streamID uint32, typ uint8, payload []byte) error {
	return c.WriteRaw(Header(uint32(len(payload)), streamID, typ, 0), payload)
}

// WriteRaw writes the given byte slices back to back.
func (c *Conn) WriteRaw(parts ...[]byte) error {
	for _, p := range parts {
		if _, err := c.Write(p); err != nil {
			return err
		}
	}
	return nil
}

// WriteRequest marshals req and sends it as a request frame.
func (c *Conn) WriteRequest(streamID uint32, req *ttrpc.Request) error {
	p, err := proto.Marshal(req)
	if err != nil {
		return err
	}
	return c.WriteFrame(streamID, TypeRequest, p)
}

// ReadFrame reads one frame, failing after timeout.
func (c *Conn) ReadFrame(timeout time.Duration) (*Frame, error) {
	if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return nil, err
	}
	defer c.SetReadDeadline(time.Time{})
	h := make([]byte, HeaderLen)
	if _, err := io.ReadFull(c, h); err != nil {
		return nil, err
	}
	f := &Frame{
		Length:   binary.BigEndian.Uint32(h[0:4]),
		StreamID: binary.BigEndian.Uint32(h[4:8]),
		Type:     h[8],
		Flags:    h[9],
	}
	if f.Length > 64<<20 {
		return nil, fmt.Errorf("response frame claims %d bytes", f.Length)
	}
	f.Payload = make([]byte, f.Length)
	if _, err := io.ReadFull(c, f.Payload); err != nil {
		return nil, err
	}
	return f, nil
}

// ReadResponse reads one frame and decodes it as a ttrpc.Response. It checks
// that the frame is a response (type 2, flags 0).
func (c *Conn) ReadResponse(timeout time.Duration) (*Frame, *ttrpc.Response, error) {
	f, err := c.ReadFrame(timeout)
	if err != nil {
		return nil, nil, err
	}
	if f.Type != TypeResponse || f.Flags != 0 {
		return f, nil, fmt.Errorf("frame for stream %d has type %d flags %d, want type 2 flags 0", f.StreamID, f.Type, f.Flags)
	}
	var resp ttrpc.Response
	if err := proto.Unmarshal(f.Payload, &resp); err != nil {
		return f, nil, fmt.Errorf("response envelope does not decode: %v", err)
	}
	return f, &resp, nil
}

// Code returns the status code of a response (0 when status is absent).
func Code(r *ttrpc.Response) int32 {
	if r == nil || r.Status == nil {
		return 0
	}
	return r.Status.Code
}

// Message returns the status message of a response.
func Message(r *ttrpc.Response) string {
	if r == nil || r.Status == nil {
		return ""
	}
	return r.Status.Message
}

// NewRequest builds an envelope; payload is marshalled when it is a proto.Message.
func NewRequest(service, method string, payload proto.Message, md ...string) (*ttrpc.Request, error) {
	req := &ttrpc.Request{Service: service, Method: method}
	if payload != nil {
		p, err := proto.Marshal(payload)
		if err != nil {
			return nil, err
		}
		req.Payload = p
	}
	for i := 0; i+1 < len(md); i += 2 {
		req.Metadata = append(req.Metadata, &ttrpc.KeyValue{Key: md[i], Value: md[i+1]})
	}
	return req, nil
}
