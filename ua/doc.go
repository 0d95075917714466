// Package ua is the EMSD device user agent (RFC 2524): what a small device,
// or a gateway box standing in for many, runs to submit mail to an EMSD
// message transfer system (MTS) and to receive deliveries from it.
//
// A Client works over one *esro.Endpoint, one UDP socket used in both ESRO
// roles (docs/protocol.md EMSD §1.2):
//
//   - as invoker it submits messages (op 33, UA SAP 4 → MTS SAP 5, 3-way,
//     segmented to the ESRO PDU size, §8, §10.2), sends delivery control
//     (op 2) and delivery verify (op 5) to MTS SAP 9 (2-way, §10.5, Open
//     Point 12);
//   - as performer it receives deliveries (op 35 on SAP 3, 3-way, and SAP
//     7, 2-way; EMSD 1.0 op 1 on SAP 3) with reassembly and the
//     instance-id duplicate window (§1.5, §8, §10.3), and answers submission
//     verify (op 6, SAP 7) from a list of recent submissions (§10.4).
//
// Complete messages are handed to a Handler, which must store them durably
// before it returns: the RESULT that tells the MTS the delivery is done is
// sent only afterwards, and a Handler error makes the MTS retry later.
// Maildir is such a Handler, writing RFC 5322 files.
//
// The instance-id window only catches an INVOKE repeated within one
// attempt. When the MTS crashes or loses the exchange after the device
// stored a message but before recording it as delivered, it delivers the
// message again later in a new attempt (new instance ids, delivery time
// and segmentation, §9.9), possibly to a restarted device. Maildir
// recognises such a re-delivery across restarts by its Fingerprint (message
// id, submission time and canonical IPM, not the delivery time), kept in a
// small index file in the Maildir (DeliveredIndexName), and answers it as
// done without storing it again; two messages that only share an id are
// both stored. Other Handlers get every re-delivery, and can use
// Delivery.Fingerprint to do the same.
//
// Comments cite the EMSD sections of docs/protocol.md as "§n".
package ua
