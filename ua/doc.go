// Package ua is the EMSD device user agent (RFC 2524): what a small device,
// or a gateway box standing in for many, runs to submit mail to an EMSD
// message transfer system (MTS) and to receive deliveries from it.
//
// A Client works over one *esro.Endpoint, one UDP socket used in both ESRO
// roles (spec emsd.md §1.2):
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
// Comments cite the project spec emsd.md as "§n".
package ua
